//! The agent's TOML configuration: whom to watch, the rules, and how to reach the decider.
//!
//! Parse errors carry the file, line and column of the problem; semantic errors (an unknown
//! account, a bad CIDR or glob) name the rule and the field.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::policy::Decision;

/// Errors reading or checking a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has a wrong field.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A value is well-formed TOML but makes no sense.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the rule or field.
        message: String,
    },
    /// A rule's `[[rule.example]]` is not what the file decides, or cannot be tested.
    #[error("{path}:{line}:{column}: {message}")]
    Example {
        /// The file.
        path: PathBuf,
        /// 1-based line of the example's action.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The rule, the example, and what the file decides instead.
        message: String,
    },
}

/// What to do with held actions when the decider cannot be reached.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FailMode {
    /// Deny: kill the exec, refuse the connect (the default).
    #[default]
    Deny,
    /// Allow: resume the task. Only for break-glass set-ups.
    Allow,
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How the agent runs and reaches its decider.
    #[serde(default)]
    pub agent: AgentSection,
    /// Which tasks are watched.
    #[serde(default)]
    pub watch: WatchSection,
    /// Rules, in order; the first that matches an action decides it.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
}

/// `[agent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// gRPC address of the decider (the control plane), e.g. `http://127.0.0.1:7443`; or
    /// several replicas' addresses, as a list (`["https://a:7443", "https://b:7443"]`) or
    /// separated by commas. The agent uses the first that answers and, when it fails, moves to
    /// the next and sends its held requests there again (the same requests, by id). Kept as
    /// one comma-separated string.
    #[serde(deserialize_with = "one_or_many")]
    pub decider: Option<String>,
    /// Host identity; defaults to /etc/machine-id, then the hostname.
    pub host_id: Option<String>,
    /// File holding this agent's credential (an `agent` token from `airlock-server tokens
    /// create --scope agent --name <host id>`). The AIRLOCK_AGENT_TOKEN environment variable
    /// takes precedence.
    pub token_file: Option<PathBuf>,
    /// File holding a one-time enrollment token (`airlock-server tokens create --scope enroll`).
    /// When `token_file` is missing or empty at start, the agent trades this token with the
    /// decider for its own credential, writes that to `token_file` (mode 0600) and deletes
    /// this file, which is spent. Needs `token_file`.
    pub enroll_token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for an `https://` decider; default: the system roots are
    /// not used, so set this for https.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS, with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// Client key (PEM) for mTLS.
    pub tls_key_file: Option<PathBuf>,
    /// Address for `/metrics` (Prometheus) and `/healthz`, e.g. `127.0.0.1:9464`; none by
    /// default.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where the rules sent by the control plane are cached, so a restarted host enforces
    /// them before the control plane is reachable.
    pub rules_cache: PathBuf,
    /// Labels sent in the hello (`env = "prod"`), used by the control plane to pick rules.
    pub labels: BTreeMap<String, String>,
    /// Default deadline of a hold, in seconds, when a rule sets none.
    pub hold_timeout_secs: u64,
    /// What applies when the decider is unreachable.
    pub fail_mode: FailMode,
    /// How long a hold waits for an unreachable decider to come back before the fail mode applies.
    pub unreachable_grace_secs: u64,
    /// bpffs directory where maps and links are pinned, so holds survive an agent crash.
    pub bpffs_dir: PathBuf,
    /// Environment variable names whose values are sent with a request (others: names only).
    pub env_allow: Vec<String>,
    /// Hold every exec of a watched task, not only the binaries the rules name.
    pub hold_all_execs: bool,
    /// If the agent's heartbeat is older than this, the kernel fails closed instead of holding.
    pub heartbeat_timeout_secs: u64,
    /// Size of the kernel's table of watched tasks (every thread and process a watched task
    /// starts is marked). When it is full, watched tasks cannot fork (they get ENOMEM): a task
    /// that could not be marked would run unwatched after a setuid. Applies when the programs
    /// are first loaded (after `--uninstall`, or a reboot).
    pub max_watched_tasks: u32,
    /// Recognise copies of the binaries the rules name: an exec of a file the watched account
    /// could have made (owned or writable by it: a copy, a download, a memfd) is held until its
    /// SHA-256 is compared with those binaries'. A copy is held as the binary; anything else
    /// runs on (and is not held again until it changes). `exec = ["@self-made"]` rules need it.
    pub copy_detection: bool,
    /// Whether rules enforce (hold, decide) or only observe (record what would have happened,
    /// never stop the action). A rule's own `mode` wins. Roll a policy out in observe mode
    /// first, read what it would have held (`airlockctl policy suggest`), then enforce.
    pub mode: Mode,
    /// Tell a held task what is happening on its standard error: one line when it is held
    /// (what, the request, how long, the link) and one when it is decided. Written through
    /// the task's own fd 2, only when that is a tty, pipe or regular file opened for writing,
    /// never blocking. A rule's own `notices` wins.
    pub notices: bool,
    /// Most requests waiting for a decision at once on this host; past it a new hold is
    /// denied at once ("too many pending requests").
    pub max_pending: u32,
    /// Most requests waiting for a decision at once for one account (the watched account a
    /// task descends from); past it a new hold of that account is denied at once.
    pub max_pending_per_account: u32,
    /// Most requests one account may have asked ahead (`airlock-agent mcp`) and still waiting,
    /// counted apart from held tasks' requests.
    pub max_asked_ahead_per_account: u32,
    /// The local socket AI agents on this host reach the agent on, through `airlock-agent
    /// mcp` (would this be held, ask ahead, a request's state, recent decisions). Root's,
    /// open to every account: who asks comes from the connection (SO_PEERCRED). Empty: none.
    pub local_socket: PathBuf,
    /// Shortest time a DNS name's addresses (in a rule's `connect`) are kept before it is
    /// looked up again, whatever its TTL says.
    pub dns_min_ttl_secs: u64,
    /// Longest time before a DNS name in a rule's `connect` is looked up again.
    pub dns_max_ttl_secs: u64,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            decider: None,
            host_id: None,
            token_file: None,
            enroll_token_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            metrics_addr: None,
            rules_cache: PathBuf::from("/var/lib/airlock-agent/server-rules.toml"),
            labels: BTreeMap::new(),
            hold_timeout_secs: 60,
            fail_mode: FailMode::Deny,
            unreachable_grace_secs: 3,
            bpffs_dir: PathBuf::from("/sys/fs/bpf/airlock"),
            env_allow: Vec::new(),
            hold_all_execs: false,
            heartbeat_timeout_secs: 5,
            max_watched_tasks: 131_072,
            copy_detection: true,
            mode: Mode::Enforce,
            notices: true,
            max_pending: 20,
            max_pending_per_account: 20,
            max_asked_ahead_per_account: 5,
            local_socket: PathBuf::from("/run/airlock/agent.sock"),
            dns_min_ttl_secs: 5,
            dns_max_ttl_secs: 300,
        }
    }
}

impl AgentSection {
    /// Default hold deadline.
    pub fn hold_timeout(&self) -> Duration {
        Duration::from_secs(self.hold_timeout_secs)
    }
}

/// `[watch]`: a task is watched if any of these match it, or if an ancestor was watched.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchSection {
    /// Account names (or numeric uids).
    pub users: Vec<String>,
    /// Group names (or numeric gids): tasks whose real gid is one of these.
    pub groups: Vec<String>,
    /// cgroup v2 directories, absolute or relative to /sys/fs/cgroup.
    pub cgroups: Vec<String>,
    /// systemd units, e.g. `ci-runner.service` (looked up under system.slice).
    pub units: Vec<String>,
}

/// Whether a rule enforces or only observes.
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Hold the action and apply the rule's decision.
    #[default]
    Enforce,
    /// Let the action run and record what the rule would have done.
    Observe,
}

/// What applies when a hold's deadline passes.
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnTimeout {
    /// The action is allowed.
    Allow,
    /// The action is denied.
    #[default]
    Deny,
    /// There is no deadline: the task stays held until someone decides or it exits.
    Wait,
}

/// What a rule does on deny for a connect.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectDeny {
    /// The call fails with EACCES ("Permission denied").
    #[default]
    Refuse,
    /// The task is killed.
    Kill,
}

/// Transport protocol a connect rule applies to.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ProtocolFilter {
    /// TCP and UDP.
    #[default]
    Any,
    /// TCP (stream sockets).
    Tcp,
    /// UDP (datagram sockets).
    Udp,
}

/// One `[[rule]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique name, shown to approvers and in the audit trail.
    pub name: String,
    /// Free text shown to approvers.
    #[serde(default)]
    pub description: String,
    /// Programs (absolute paths) whose exec this rule covers, including scripts (held whatever
    /// interpreter runs them), runs through a dynamic loader (`ld.so PROGRAM`) and copies of
    /// them; `"*"` covers every exec; `"@self-made"` covers files the watched account could
    /// have made (owned or writable by it).
    #[serde(default)]
    pub exec: Vec<String>,
    /// Accounts (user names) the rule applies to; empty: every watched account.
    #[serde(default)]
    pub accounts: Vec<String>,
    /// Argument patterns, any one of which must match the program's arguments (argv[0] is never
    /// one), as tokens: each word matches one argument as a glob, and `*` alone matches any
    /// number of arguments. `"* delete *"` holds `delete` wherever it comes, after any flags;
    /// `"delete *"` only as the first argument. Empty: any arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Destination networks (CIDR, IPv4 or IPv6) whose connects this rule covers.
    #[serde(default)]
    pub connect: Vec<String>,
    /// Destination ports; empty: any port.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Which transport.
    #[serde(default)]
    pub protocol: ProtocolFilter,
    /// allow, deny or ask.
    pub decision: Decision,
    /// Deadline of a hold under this rule, seconds.
    pub timeout_secs: Option<u64>,
    /// What applies when the deadline passes: deny (the default), allow, or wait (no deadline:
    /// held until someone decides or the task exits; `timeout_secs` is then not used).
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// enforce or observe; default: `agent.mode`.
    pub mode: Option<Mode>,
    /// Tell the held task on its stderr; default: `agent.notices`.
    pub notices: Option<bool>,
    /// For connect: refuse the call or kill the task on deny.
    #[serde(default)]
    pub on_deny: ConnectDeny,
    /// Risk label shown to approvers.
    #[serde(default)]
    pub risk: String,
    /// `[[rule.example]]`: actions and what the whole file decides for each, checked when the
    /// file loads (see [`crate::examples`]).
    #[serde(default, rename = "example")]
    pub examples: Vec<crate::examples::Example>,
}

impl Config {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses configuration text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().to_owned(),
            }
        })?;
        config.check(path)?;
        crate::examples::check(&config, text, path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut names = std::collections::HashSet::new();
        for rule in &self.rules {
            if rule.name.trim().is_empty() {
                return Err(invalid("a [[rule]] has an empty name".into()));
            }
            if !names.insert(rule.name.as_str()) {
                return Err(invalid(format!("rule {:?} is defined twice", rule.name)));
            }
            let is_exec = !rule.exec.is_empty();
            let is_connect = !rule.connect.is_empty();
            if is_exec == is_connect {
                return Err(invalid(format!(
                    "rule {:?}: set exactly one of `exec` (binaries) or `connect` (CIDRs)",
                    rule.name
                )));
            }
            if rule.on_timeout == OnTimeout::Wait && rule.timeout_secs.is_some() {
                return Err(invalid(format!(
                    "rule {:?}: on_timeout = \"wait\" has no deadline; remove timeout_secs",
                    rule.name
                )));
            }
        }
        if self.rules.len() > 64 {
            return Err(invalid(format!(
                "{} rules; at most 64 are supported per agent",
                self.rules.len()
            )));
        }
        if self.agent.enroll_token_file.is_some() && self.agent.token_file.is_none() {
            return Err(invalid(
                "agent.enroll_token_file needs agent.token_file: where the credential it is \
                 traded for is kept"
                    .into(),
            ));
        }
        if let Some(list) = &self.agent.decider {
            let addrs: Vec<&str> = list.split(',').map(str::trim).collect();
            for addr in &addrs {
                if addr.is_empty() {
                    return Err(invalid(format!(
                        "agent.decider {list:?} has an empty address"
                    )));
                }
                if !(addr.starts_with("http://") || addr.starts_with("https://")) {
                    return Err(invalid(format!(
                        "agent.decider {addr:?} must start with http:// or https://"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// `agent.decider`: one address, or a list of them, kept as one comma-separated string.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Addresses;
    impl<'de> serde::de::Visitor<'de> for Addresses {
        type Value = String;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an address (\"https://host:7443\") or a list of addresses")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
            let mut all = Vec::new();
            while let Some(a) = seq.next_element::<String>()? {
                if a.contains(',') {
                    return Err(serde::de::Error::custom(format!(
                        "decider address {a:?} has a comma; list each address on its own"
                    )));
                }
                all.push(a);
            }
            Ok(all.join(","))
        }
    }
    d.deserialize_any(Addresses).map(Some)
}

/// 1-based line and column of byte offset `pos` in `text` (columns count characters), for
/// errors that say where; the control plane's files use it too.
pub fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let before = &text[..pos.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_error_names_line_and_column() {
        let text = "[agent]\nhold_timeout_secs = 30\n\n[[rule]]\nname = \"x\"\ndecision = \"maybe\"\nexec = [\"/bin/true\"]\n";
        let err = Config::parse(text, Path::new("agent.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("agent.toml:6:12:"), "{msg}");
        assert!(msg.contains("maybe"), "{msg}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let err = Config::parse("[agent]\nholdtimeout = 3\n", Path::new("a.toml")).unwrap_err();
        assert!(err.to_string().contains("a.toml:2:1"), "{err}");
        assert!(err.to_string().contains("holdtimeout"), "{err}");
    }

    #[test]
    fn rule_needs_exactly_one_kind() {
        let text = "[[rule]]\nname = \"both\"\ndecision = \"ask\"\nexec = [\"/bin/a\"]\nconnect = [\"10.0.0.0/8\"]\n";
        let err = Config::parse(text, Path::new("a.toml")).unwrap_err();
        assert!(err.to_string().contains("rule \"both\""), "{err}");
    }

    #[test]
    fn enrolment_needs_a_credential_file() {
        let err = Config::parse("[agent]\nenroll_token_file = \"/e\"\n", Path::new("a.toml"))
            .unwrap_err();
        assert!(err.to_string().contains("agent.token_file"), "{err}");
        let ok = Config::parse(
            "[agent]\nenroll_token_file = \"/e\"\ntoken_file = \"/t\"\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(ok.agent.enroll_token_file.as_deref(), Some(Path::new("/e")));
    }

    #[test]
    fn decider_takes_one_address_or_several() {
        let one = Config::parse(
            "[agent]\ndecider = \"http://a:7443\"\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(one.agent.decider.as_deref(), Some("http://a:7443"));
        let list = Config::parse(
            "[agent]\ndecider = [\"https://a:7443\", \"https://b:7443\"]\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(
            list.agent.decider.as_deref(),
            Some("https://a:7443,https://b:7443")
        );
        let err = Config::parse(
            "[agent]\ndecider = [\"https://a:7443\", \"b:7443\"]\n",
            Path::new("a.toml"),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("agent.decider \"b:7443\" must start with http:// or https://"),
            "{err}"
        );
        let err = Config::parse("[agent]\ndecider = 7443\n", Path::new("a.toml")).unwrap_err();
        assert!(err.to_string().starts_with("a.toml:2:"), "{err}");
        assert!(err.to_string().contains("a list of addresses"), "{err}");
    }

    #[test]
    fn defaults_fail_closed() {
        let c = Config::parse("", Path::new("a.toml")).unwrap();
        assert_eq!(c.agent.fail_mode, FailMode::Deny);
        let text = "[[rule]]\nname = \"r\"\ndecision = \"ask\"\nexec = [\"/bin/a\"]\n";
        let c = Config::parse(text, Path::new("a.toml")).unwrap();
        assert_eq!(c.rules[0].on_timeout, OnTimeout::Deny);
    }
}
