//! The server's configuration file (TOML): the web UI, OIDC login and the notification channels.
//!
//! Secrets (client secret, Slack tokens, webhook keys, a Teams URL) are never written in this
//! file: each is named by a `*_file` key and read from that file, so the file can be world-
//! readable and the secrets are never logged (their `Debug` prints `[redacted]`).
//!
//! ```toml
//! [web]
//! public_url = "https://airlock.example.com"   # base of links in notifications and OIDC
//!
//! [oidc]
//! issuer = "https://example.okta.com"
//! client_id = "0oa1b2c3"
//! client_secret_file = "/etc/airlock/oidc-client-secret"
//! groups_claim = "groups"
//!
//! [slack]
//! channel = "C0123456789"
//! bot_token_file = "/etc/airlock/slack-bot-token"
//! signing_secret_file = "/etc/airlock/slack-signing-secret"
//! users = { U0123ABCD = "alice" }
//!
//! [teams]
//! webhook_url_file = "/etc/airlock/teams-webhook-url"
//!
//! [[webhook]]
//! name = "siem"
//! url = "https://siem.example.com/airlock"
//! secret_file = "/etc/airlock/siem-hmac-key"
//! ```

use std::{collections::BTreeMap, fmt, path::Path};

use serde::Deserialize;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
    /// Malformed TOML or an unknown key.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// File.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// Well-formed but unusable.
    #[error("{path}: {message}")]
    Invalid {
        /// File.
        path: String,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// A secret read from a file; `Debug` and `Display` never show it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The web UI.
    #[serde(default)]
    pub web: WebConfig,
    /// Login through an OIDC issuer (in addition to local accounts).
    pub oidc: Option<OidcFile>,
    /// Slack notifications and buttons.
    pub slack: Option<SlackFile>,
    /// Microsoft Teams cards.
    pub teams: Option<TeamsFile>,
    /// Generic webhooks.
    #[serde(default, rename = "webhook")]
    pub webhooks: Vec<WebhookFile>,
    /// Bounds on what agents and callers may ask.
    #[serde(default)]
    pub limits: Limits,
    /// Signed audit checkpoints.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Caps and timeouts on the gRPC and HTTP listeners' connections.
    #[serde(default)]
    pub connections: Connections,
}

/// `[connections]`: how many connections each listener keeps open and how long a new one may
/// take to say who it is. Idle or slow sockets would otherwise use up the server's file
/// descriptors, and then every agent fails closed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Connections {
    /// A new gRPC connection must send its first bytes (TLS ClientHello or HTTP/2 preface) and
    /// finish its TLS handshake within this many seconds, or it is closed.
    pub handshake_timeout_secs: u64,
    /// A gRPC connection must make an authenticated call (an agent's stream, an approver's
    /// request) within this many seconds of being accepted, or it is closed: idle connections,
    /// and ones that only call health, reflection or enrolment, do not keep a place an agent
    /// needs. Once it has, it stays open as long as its peer wants.
    pub auth_timeout_secs: u64,
    /// An HTTP request's headers must arrive within this many seconds of the connection (or of
    /// the previous response on a kept-alive connection), or it is closed.
    pub header_timeout_secs: u64,
    /// Most gRPC connections open at once (one per agent, watcher or CLI call). Beyond it new
    /// ones wait in the kernel's backlog. Keep it below the unit's LimitNOFILE.
    pub max_grpc_connections: usize,
    /// Most HTTP connections open at once (browsers, live queues, Slack callbacks, scrapes).
    pub max_http_connections: usize,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            handshake_timeout_secs: 10,
            auth_timeout_secs: 30,
            header_timeout_secs: 10,
            max_grpc_connections: 20_000,
            max_http_connections: 4_096,
        }
    }
}

impl Connections {
    /// [`Connections::handshake_timeout_secs`], at least one second.
    pub fn handshake_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.handshake_timeout_secs.max(1))
    }

    /// [`Connections::auth_timeout_secs`], at least one second.
    pub fn auth_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.auth_timeout_secs.max(1))
    }

    /// [`Connections::header_timeout_secs`], at least one second.
    pub fn header_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.header_timeout_secs.max(1))
    }
}

/// `[audit]`: signed checkpoints of the audit chain's head, so that a rewrite of the database
/// (hashes recomputed) is found by `airlockctl audit verify --checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// File holding the Ed25519 signing key: 64 hex digits (`openssl rand -hex 32`). Keep it
    /// off the database's disk and readable by the server only. Unset: no checkpoints.
    pub checkpoint_key_file: Option<String>,
    /// How often the head is signed (when the trail has grown), seconds.
    pub checkpoint_every_secs: u64,
    /// A file each checkpoint line is appended to (besides the log); put it where the
    /// database's host cannot rewrite it (another machine's mount, an append-only file).
    pub checkpoint_file: Option<String>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_key_file: None,
            checkpoint_every_secs: 300,
            checkpoint_file: None,
        }
    }
}

/// `[limits]`: bounds on what agents and callers may ask of the control plane. A request over
/// them is denied at once (the agent is told why), never stored; an outcome over them is
/// ignored and logged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request an agent may send, bytes (as encoded on the wire).
    pub max_request_bytes: usize,
    /// Most command-line arguments in a request (the program's, or the connecting process's).
    pub max_argv: usize,
    /// Most environment variables in a request.
    pub max_env: usize,
    /// Most entries in a request's parent chain.
    pub max_ancestors: usize,
    /// Most requests one host may have pending at once.
    pub max_pending_per_host: u32,
    /// Most requests one account may have pending at once, over all hosts.
    pub max_pending_per_account: u32,
    /// Latest deadline a request may have, seconds from its arrival; later ones are brought
    /// forward to it.
    pub max_deadline_secs: u64,
    /// Most outcomes (resumed, killed, exit status) an agent may report for one request.
    pub max_outcomes_per_request: u32,
    /// Most requests, grants or audit records one list call returns.
    pub max_list: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 64 * 1024,
            max_argv: 1024,
            max_env: 256,
            max_ancestors: 64,
            max_pending_per_host: 1000,
            max_pending_per_account: 1000,
            max_deadline_secs: 24 * 3600,
            max_outcomes_per_request: 8,
            max_list: 1000,
        }
    }
}

impl Limits {
    /// [`Limits::max_deadline_secs`] in milliseconds.
    pub fn max_deadline_ms(&self) -> i64 {
        i64::try_from(self.max_deadline_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// Why `req` is over a limit, if it is.
    pub fn check_request(&self, req: &airlock_proto::v1::ActionRequest) -> Result<(), String> {
        use airlock_proto::v1::action_request::Action;
        use prost::Message;
        let size = req.encoded_len();
        if size > self.max_request_bytes {
            return Err(format!(
                "the request is {size} bytes, over limits.max_request_bytes ({})",
                self.max_request_bytes
            ));
        }
        let p = req.process.clone().unwrap_or_default();
        let argv = match &req.action {
            Some(Action::Exec(e)) => e.argv.len().max(p.argv.len()),
            _ => p.argv.len(),
        };
        let counts = [
            ("arguments", argv, self.max_argv, "max_argv"),
            (
                "environment variables",
                p.env.len(),
                self.max_env,
                "max_env",
            ),
            (
                "parent processes",
                p.ancestors.len(),
                self.max_ancestors,
                "max_ancestors",
            ),
        ];
        for (what, n, max, key) in counts {
            if n > max {
                return Err(format!(
                    "the request has {n} {what}, over limits.{key} ({max})"
                ));
            }
        }
        Ok(())
    }
}

/// `[web]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// The address people reach the web UI at; links in notifications and the OIDC redirect URI
    /// are built from it. Default: the HTTP listen address. Cookies are marked Secure unless it
    /// is plain http.
    pub public_url: Option<String>,
    /// How long a login lasts, hours.
    #[serde(default = "default_session_hours")]
    pub session_hours: u32,
    /// Allow local accounts to log in (on by default; turn off to force OIDC).
    #[serde(default = "yes")]
    pub local_accounts: bool,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            public_url: None,
            session_hours: default_session_hours(),
            local_accounts: true,
        }
    }
}

fn default_session_hours() -> u32 {
    12
}

fn yes() -> bool {
    true
}

/// `[oidc]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcFile {
    /// Issuer URL; its `/.well-known/openid-configuration` is fetched at start.
    pub issuer: String,
    /// Client id registered at the issuer.
    pub client_id: String,
    /// File holding the client secret (omit for a public client: PKCE alone).
    pub client_secret_file: Option<String>,
    /// Scopes to ask for.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// ID token claim that names the person (falls back to `sub`). An `email` counts only with
    /// `email_verified: true`.
    #[serde(default = "default_identity_claim")]
    pub identity_claim: String,
    /// ID token claim that lists the person's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Issuer group (name or id, as in the claim) to approver group; claim values not listed
    /// here are ignored (map a group to itself to use it as it is).
    #[serde(default)]
    pub group_map: BTreeMap<String, String>,
    /// Approver groups (after `group_map`) allowed to log in. Required and not empty: the
    /// server refuses to start without it, since an issuer usually serves more people than
    /// your approvers and a request routed to no group may be decided by anyone who can log in.
    #[serde(default)]
    pub allowed_groups: Vec<String>,
    /// Text of the login button.
    #[serde(default = "default_oidc_label")]
    pub label: String,
}

fn default_scopes() -> Vec<String> {
    ["openid", "email", "profile"].map(String::from).to_vec()
}

fn default_identity_claim() -> String {
    "email".into()
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_oidc_label() -> String {
    "Sign in with single sign-on".into()
}

/// `[slack]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackFile {
    /// Channel id to post requests to.
    pub channel: String,
    /// File holding the bot token (`xoxb-...`, scope chat:write).
    pub bot_token_file: String,
    /// File holding the app's signing secret (verifies button presses).
    pub signing_secret_file: String,
    /// Slack user id to approver identity; presses by anyone else are refused.
    #[serde(default)]
    pub users: BTreeMap<String, String>,
    /// Web API base URL.
    #[serde(default = "default_slack_api")]
    pub api_url: String,
}

fn default_slack_api() -> String {
    "https://slack.com/api".into()
}

/// `[teams]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamsFile {
    /// File holding the incoming webhook or Workflows URL (it embeds a key).
    pub webhook_url_file: String,
}

/// One `[[webhook]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookFile {
    /// Name shown in the delivery log.
    pub name: String,
    /// Where to POST.
    pub url: String,
    /// File holding the HMAC key for `X-Airlock-Signature`.
    pub secret_file: String,
    /// Events to send (`request.received`, `request.vote`, `request.decided`); empty: all of
    /// those. `audit.checkpoint` (signed audit checkpoints) is sent only when listed.
    #[serde(default)]
    pub events: Vec<String>,
    /// Attempts per event before it is given up (logged as failed).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First retry delay, milliseconds; doubles each retry.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Per-attempt timeout, seconds.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_attempts() -> u32 {
    5
}

fn default_backoff_ms() -> u64 {
    1000
}

fn default_timeout_secs() -> u64 {
    10
}

/// Event names a webhook may subscribe to (`audit.checkpoint` only when listed).
pub const EVENTS: [&str; 4] = [
    "request.received",
    "request.vote",
    "request.decided",
    "audit.checkpoint",
];

impl ServerConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks `text`, naming `path` in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| {
            let (line, column) = toml_position(text, &e);
            ConfigError::Parse {
                path: path.into(),
                line,
                column,
                message: e.message().to_owned(),
            }
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.into(),
            message,
        };
        if let Some(u) = &cfg.web.public_url {
            url::Url::parse(u).map_err(|e| invalid(format!("web.public_url {u:?}: {e}")))?;
        }
        if let Some(o) = &cfg.oidc {
            url::Url::parse(&o.issuer).map_err(|e| invalid(format!("oidc.issuer: {e}")))?;
            if !o.scopes.iter().any(|s| s == "openid") {
                return Err(invalid("oidc.scopes must include \"openid\"".into()));
            }
            if o.allowed_groups.iter().all(|g| g.trim().is_empty()) {
                return Err(invalid(
                    "oidc.allowed_groups is missing or empty: list the approver groups (after \
                     group_map) that may log in, e.g. allowed_groups = [\"oncall\"]; without it \
                     everyone the issuer knows could log in and decide requests"
                        .into(),
                ));
            }
            if let Some(g) = o
                .allowed_groups
                .iter()
                .find(|g| !o.group_map.values().any(|m| m == *g))
            {
                return Err(invalid(format!(
                    "oidc.allowed_groups names {g:?}, which no oidc.group_map entry gives: only \
                     mapped issuer groups count"
                )));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for w in &cfg.webhooks {
            if !names.insert(&w.name) {
                return Err(invalid(format!("two webhooks are named {:?}", w.name)));
            }
            url::Url::parse(&w.url)
                .map_err(|e| invalid(format!("webhook {:?}: url: {e}", w.name)))?;
            if let Some(bad) = w.events.iter().find(|e| !EVENTS.contains(&e.as_str())) {
                return Err(invalid(format!(
                    "webhook {:?}: unknown event {bad:?} (known: {})",
                    w.name,
                    EVENTS.join(", ")
                )));
            }
            if w.max_attempts == 0 {
                return Err(invalid(format!(
                    "webhook {:?}: max_attempts must be at least 1",
                    w.name
                )));
            }
        }
        if cfg.audit.checkpoint_every_secs == 0 {
            return Err(invalid(
                "audit.checkpoint_every_secs must be at least 1".into(),
            ));
        }
        let l = &cfg.limits;
        for (key, value) in [
            ("max_request_bytes", l.max_request_bytes as u64),
            ("max_pending_per_host", l.max_pending_per_host.into()),
            ("max_pending_per_account", l.max_pending_per_account.into()),
            ("max_deadline_secs", l.max_deadline_secs),
            ("max_list", l.max_list.into()),
        ] {
            if value == 0 {
                return Err(invalid(format!("limits.{key} must be at least 1")));
            }
        }
        Ok(cfg)
    }
}

/// Reads the secret in `path`, trimmed of surrounding white space.
pub fn read_secret(path: &str) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let s = text.trim();
    if s.is_empty() {
        return Err(ConfigError::Invalid {
            path: path.into(),
            message: "the secret file is empty".into(),
        });
    }
    Ok(Secret::new(s))
}

/// Where in `text` the TOML error `e` is: 1-based line and column (in characters).
pub(crate) fn toml_position(text: &str, e: &toml::de::Error) -> (usize, usize) {
    let Some(pos) = e.span().map(|s| s.start) else {
        return (1, 1);
    };
    agent_rules::config::line_col(text, pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("xoxb-very-secret");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(s.expose(), "xoxb-very-secret");
    }

    #[test]
    fn errors_name_the_place() {
        let e = ServerConfig::parse("[web]\npublic_urll = \"x\"\n", "server.toml").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("server.toml:2:1: unknown field `public_urll`"),
            "{e}"
        );
        let e = ServerConfig::parse(
            "[[webhook]]\nname = \"a\"\nurl = \"http://x\"\nsecret_file = \"k\"\nevents = [\"request.nope\"]\n",
            "server.toml",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("unknown event \"request.nope\""),
            "{e}"
        );
    }

    #[test]
    fn oidc_without_allowed_groups_is_refused() {
        let base = "[oidc]\nissuer = \"https://idp.example\"\nclient_id = \"c\"\n";
        let e = ServerConfig::parse(base, "server.toml").unwrap_err();
        assert!(
            e.to_string()
                .contains("oidc.allowed_groups is missing or empty"),
            "{e}"
        );
        let e = ServerConfig::parse(&format!("{base}allowed_groups = []\n"), "server.toml")
            .unwrap_err();
        assert!(e.to_string().contains("allowed_groups"), "{e}");
        let e = ServerConfig::parse(
            &format!("{base}allowed_groups = [\"oncall\"]\n"),
            "server.toml",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("which no oidc.group_map entry gives"),
            "{e}"
        );
        let ok = format!(
            "{base}allowed_groups = [\"oncall\"]\ngroup_map = {{ okta-oncall = \"oncall\" }}\n"
        );
        ServerConfig::parse(&ok, "server.toml").unwrap();
    }

    #[test]
    fn defaults_allow_local_accounts() {
        let c = ServerConfig::parse("", "x").unwrap();
        assert!(c.web.local_accounts);
        assert_eq!(c.web.session_hours, 12);
        assert!(c.oidc.is_none() && c.slack.is_none() && c.webhooks.is_empty());
    }
}
