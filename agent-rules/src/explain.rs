//! The rule tester: what a set of rules decides for one action given on a command line
//! (`--exec "kubectl -n prod delete ns payments"`, `--connect 10.20.3.4:5432`), with no kernel
//! and no held task. `airlock-agent --explain`, `airlockctl policy test` and the checked
//! `[[rule.example]]`s ([`crate::examples`]) all use it.
//!
//! It builds what the agent would match ([`ExecSubject`], or an address and port) and asks the
//! agent's own matchers ([`Policy::match_exec`], [`Policy::match_connect`]), so the tester
//! cannot drift from what the agent enforces. What it cannot know without the real exec it
//! takes as plain, and says so in its notes:
//! - files are named as the kernel names them (device and inode) when they are on this host,
//!   so a symlink or another path to a rule's binary matches as it does in the kernel; a file
//!   that is not on this host is named by its path as written;
//! - a program is what its path names: not a copy of a rule binary (the agent finds copies by
//!   SHA-256 when they run) and not made by the account unless the test says so
//!   (`--self-made`);
//! - a script on this host is matched with its `#!` interpreters, as the kernel runs it.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    io::Read,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use agent_common::FileKey;
use serde::{Deserialize, Serialize};

use crate::{
    config::{AgentSection, ConfigError, Mode, OnTimeout, RuleConfig},
    identity,
    policy::{display_addr, to_v6, Decision, ExecSubject, Identity, Matcher, Policy, SELF_MADE},
};

/// Exit status of the testers when the rules allow the action: no rule holds it, or an
/// `allow` rule decides it.
pub const EXIT_ALLOW: u8 = 0;
/// Exit status when the action would be held and asked (an `ask` rule).
pub const EXIT_ASK: u8 = 10;
/// Exit status when a `deny` rule decides the action.
pub const EXIT_DENY: u8 = 11;

/// The exit status scripts get for `decision` (see [`EXIT_ALLOW`], [`EXIT_ASK`], [`EXIT_DENY`]).
pub fn exit_code(decision: Decision) -> u8 {
    match decision {
        Decision::Allow => EXIT_ALLOW,
        Decision::Ask => EXIT_ASK,
        Decision::Deny => EXIT_DENY,
    }
}

/// The rule that decides among `matching` (in order), as the agent picks it: the first,
/// unless it only observes and an enforcing rule matches after it (observe rules record; they
/// never let through what another rule holds).
fn pick<'a>(
    matching: impl Iterator<Item = &'a crate::policy::Rule>,
    mode: Mode,
    notes: &mut Vec<String>,
) -> Option<&'a crate::policy::Rule> {
    let all: Vec<&crate::policy::Rule> = matching.collect();
    let observes = |r: &crate::policy::Rule| r.config.mode.unwrap_or(mode) == Mode::Observe;
    let first = *all.first()?;
    if !observes(first) {
        return Some(first);
    }
    match all.iter().find(|r| !observes(r)) {
        Some(enforcing) => {
            notes.push(format!(
                "rule {:?} matches first but only observes (it records the action); rule {:?} after it enforces",
                first.config.name, enforcing.config.name
            ));
            Some(enforcing)
        }
        None => Some(first),
    }
}

/// The word people use for a decision.
pub fn decision_word(decision: Decision) -> &'static str {
    match decision {
        Decision::Allow => "allow",
        Decision::Deny => "deny",
        Decision::Ask => "ask",
    }
}

/// Most `#!` levels followed, as many as the kernel's binfmt_script allows.
const MAX_SCRIPT_LEVELS: usize = 4;

/// Kernel device number given to files that are not on this host: no real device has it (a
/// major of 4095 and minor of 1048575), so such a key only ever equals another made-up one.
const NOT_ON_HOST: u32 = u32::MAX;

/// Transport of a tested connect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// A stream socket.
    #[default]
    Tcp,
    /// A datagram socket.
    Udp,
}

impl Transport {
    /// The socket type the agent's matcher takes (1 stream, 2 datagram).
    fn sock_type(self) -> u32 {
        match self {
            Transport::Tcp => 1,
            Transport::Udp => 2,
        }
    }
}

/// What is wrong with an action given to the tester.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// `--exec ""`.
    #[error(
        "the command line is empty: give the program and its arguments, like \"kubectl get pods\""
    )]
    Empty,
    /// Unbalanced quotes and the like.
    #[error("cannot split {line:?} into words as a shell does: {reason}")]
    Split {
        /// The command line.
        line: String,
        /// Why.
        reason: String,
    },
    /// A bare program name found nowhere.
    #[error("program {program:?} is not in PATH here and no rule names a program of that name: give its absolute path")]
    NotFound {
        /// The name.
        program: String,
    },
    /// Not `ADDRESS:PORT`.
    #[error("destination {0:?} is not ADDRESS:PORT, like 10.20.3.4:5432 or [2001:db8::5]:5432")]
    Destination(String),
    /// A host name where an address is needed.
    #[error(
        "destination {destination:?}: {host:?} does not resolve on this host (a name is tested as the addresses it resolves to)"
    )]
    Name {
        /// What was given.
        destination: String,
        /// Its host part.
        host: String,
    },
}

/// How the program of a tested command line was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "how")]
pub enum Found {
    /// The command line named it by a path (a relative one from the current directory).
    Given,
    /// A bare name, found in a directory of `PATH`.
    SearchPath,
    /// A bare name that is not in `PATH` here: the binary with that file name that `rule`
    /// names (the first in file order).
    Rule {
        /// The rule.
        rule: String,
    },
}

/// An action to test, as given (`--exec LINE` or `--connect ADDRESS:PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// A command line.
    Exec {
        /// The command line, split as a shell splits it.
        line: String,
        /// Test the program as a file the account could have made.
        self_made: bool,
    },
    /// A destination.
    Connect {
        /// `ADDRESS:PORT`.
        destination: String,
        /// Transport.
        protocol: Transport,
    },
}

impl Query {
    /// The action, resolved against `rules` (a bare program name not in `PATH` is the binary
    /// of that name one of them names).
    pub fn resolve(&self, rules: &[RuleConfig]) -> Result<Action, ActionError> {
        match self {
            Query::Exec { line, self_made } => Action::exec(line, *self_made, rules),
            Query::Connect {
                destination,
                protocol,
            } => Action::connect(destination, *protocol),
        }
    }
}

/// An action to test, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Action {
    /// An exec.
    Exec {
        /// The first word of the command line.
        given: String,
        /// The program it names.
        program: PathBuf,
        /// How `program` was found.
        found: Found,
        /// The arguments after the program (argv[0] is never one).
        args: Vec<String>,
        /// Whether to test it as a file the account could have made.
        self_made: bool,
        /// When the program is a script on this host: its `#!` interpreters, the one that runs
        /// it first, the one the kernel finally runs last.
        interpreters: Vec<PathBuf>,
    },
    /// A connect (or an addressed send).
    Connect {
        /// Destination address.
        address: IpAddr,
        /// Destination port.
        port: u16,
        /// Transport.
        protocol: Transport,
        /// The host name given, when the destination was a name (resolved on this host).
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

impl Action {
    /// The exec of the command line `line`, split as a shell splits words. A first word with a
    /// `/` is a path (relative ones from the current directory); a bare name is looked up in
    /// `PATH`, and when it is not there, taken as the binary of that file name a rule in
    /// `rules` names, so that a file tests the same on hosts without that program installed.
    pub fn exec(line: &str, self_made: bool, rules: &[RuleConfig]) -> Result<Self, ActionError> {
        let search: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        Self::exec_in(line, self_made, rules, &search, &cwd)
    }

    /// [`Action::exec`] with the search path and current directory given.
    pub fn exec_in(
        line: &str,
        self_made: bool,
        rules: &[RuleConfig],
        search: &[PathBuf],
        cwd: &Path,
    ) -> Result<Self, ActionError> {
        let words = shell_words::split(line).map_err(|e| ActionError::Split {
            line: line.to_owned(),
            reason: e.to_string(),
        })?;
        let Some((given, args)) = words.split_first() else {
            return Err(ActionError::Empty);
        };
        if given.is_empty() {
            return Err(ActionError::Empty);
        }
        let (program, found) = if given.contains('/') {
            (cwd.join(given), Found::Given)
        } else if let Some(p) = search
            .iter()
            .map(|dir| dir.join(given))
            .find(|p| is_executable(p))
        {
            (p, Found::SearchPath)
        } else {
            rules
                .iter()
                .find_map(|r| {
                    r.exec
                        .iter()
                        .map(Path::new)
                        .find(|p| p.is_absolute() && p.file_name() == Some(given.as_ref()))
                        .map(|p| {
                            (
                                p.to_owned(),
                                Found::Rule {
                                    rule: r.name.clone(),
                                },
                            )
                        })
                })
                .ok_or_else(|| ActionError::NotFound {
                    program: given.clone(),
                })?
        };
        let mut interpreters = Vec::new();
        let mut current = program.clone();
        while interpreters.len() < MAX_SCRIPT_LEVELS {
            let Some((interpreter, _)) = shebang(&current) else {
                break;
            };
            interpreters.push(interpreter.clone());
            current = interpreter;
        }
        Ok(Action::Exec {
            given: given.clone(),
            program,
            found,
            args: args.to_vec(),
            self_made,
            interpreters,
        })
    }

    /// A connect to `destination` (`ADDRESS:PORT`, IPv6 in brackets) over `protocol`.
    pub fn connect(destination: &str, protocol: Transport) -> Result<Self, ActionError> {
        if let Ok(sa) = destination.parse::<SocketAddr>() {
            return Ok(Action::Connect {
                address: sa.ip(),
                port: sa.port(),
                protocol,
                name: None,
            });
        }
        // A host name: the address it resolves to here, first, as the agent's would.
        if let Some((host, port)) = destination.rsplit_once(':') {
            if let (Ok(port), true) = (port.parse::<u16>(), crate::policy::is_host_name(host)) {
                use std::net::ToSocketAddrs;
                let address = (host, port)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| ActionError::Name {
                        destination: destination.to_owned(),
                        host: host.to_owned(),
                    })?
                    .ip();
                return Ok(Action::Connect {
                    address,
                    port,
                    protocol,
                    name: Some(crate::policy::canonical_name(host)),
                });
            }
        }
        // Say which part is wrong: a name (rules match addresses) or the form itself.
        match destination.rsplit_once(':') {
            Some((host, port))
                if port.parse::<u16>().is_ok()
                    && !host.is_empty()
                    && !host.contains(':')
                    && host.parse::<IpAddr>().is_err() =>
            {
                Err(ActionError::Name {
                    destination: destination.to_owned(),
                    host: host.to_owned(),
                })
            }
            _ => Err(ActionError::Destination(destination.to_owned())),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Exec { program, args, .. } => {
                let words: Vec<String> = std::iter::once(program.display().to_string())
                    .chain(args.iter().cloned())
                    .collect();
                write!(f, "exec {}", shell_words::join(words))
            }
            Action::Connect {
                address: IpAddr::V6(a),
                port,
                protocol,
                name: None,
            } => write!(f, "connect [{a}]:{port} ({})", transport_word(*protocol)),
            Action::Connect {
                address,
                port,
                protocol,
                name: Some(name),
            } => write!(
                f,
                "connect {name} ({address}):{port} ({})",
                transport_word(*protocol)
            ),
            Action::Connect {
                address,
                port,
                protocol,
                name: None,
            } => write!(
                f,
                "connect {address}:{port} ({})",
                transport_word(*protocol)
            ),
        }
    }
}

fn transport_word(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The interpreter and optional argument of `file`'s `#!` line, when it is a script this host
/// can read. Like the kernel: the first 256 bytes, the interpreter up to the first blank, and
/// the rest of the line (trimmed) as one argument.
fn shebang(file: &Path) -> Option<(PathBuf, Option<String>)> {
    // Opened without waiting (a FIFO swapped in after a check would block the open, a lease
    // would hold it), then checked to be a regular file through the open file itself.
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(file)
        .ok()?;
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return None;
    }
    let mut head = Vec::with_capacity(256);
    f.take(256).read_to_end(&mut head).ok()?;
    let line = head.strip_prefix(b"#!")?;
    let line = line.split(|b| *b == b'\n').next()?;
    let line = String::from_utf8_lossy(line);
    let line = line.trim_matches([' ', '\t']);
    let (interpreter, arg) = match line.split_once([' ', '\t']) {
        Some((i, a)) => (i, Some(a.trim_matches([' ', '\t']).to_owned())),
        None => (line, None),
    };
    if interpreter.is_empty() {
        return None;
    }
    Some((PathBuf::from(interpreter), arg.filter(|a| !a.is_empty())))
}

/// Names files for matching: as the kernel does (device and inode) when they are on this host,
/// else by their path as written, with a key no real file has.
#[derive(Debug, Default)]
struct Keys {
    made_up: HashMap<PathBuf, FileKey>,
}

impl Keys {
    fn key(&mut self, path: &Path) -> FileKey {
        if let Ok(key) = identity::file_key(path) {
            return key;
        }
        let next = self.made_up.len() as u64 + 1;
        *self.made_up.entry(path.to_owned()).or_insert(FileKey {
            ino: next,
            dev: NOT_ON_HOST,
            pad: 0,
        })
    }
}

/// Rules compiled for testing: every binary they name counts, installed on this host or not.
#[derive(Debug)]
pub struct Tester {
    policy: Policy,
    keys: Keys,
    hold_timeout_secs: u64,
    mode: Mode,
    /// `agent.hold_all_execs`: the kernel holds every exec.
    hold_all_execs: bool,
}

/// The rule that decides a tested action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decider {
    /// Its name.
    pub name: String,
    /// Its place among the rules tried, from 1.
    pub position: usize,
    /// What it decides.
    pub decision: Decision,
    /// Its description.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Its risk label.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub risk: String,
}

/// What the rules decide for one action, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The action, resolved.
    pub action: Action,
    /// The account tested; none: an account no rule lists.
    pub account: Option<String>,
    /// The rule that matches in full (first in order), if any.
    pub rule: Option<Decider>,
    /// What happens: the rule's decision, or allow when no rule matches.
    pub decision: Decision,
    /// The deciding rule is in observe mode (its own `mode`, else `agent.mode`): the action
    /// runs, and the request records `decision` as what would have happened.
    pub observe: bool,
    /// Whether the kernel holds the action at all: some rule names the program or the
    /// destination (for any account). Held with no rule matching in full means resumed at once.
    pub held: bool,
    /// For ask: seconds until `on_timeout` applies (the rule's `timeout_secs`, else the agent's
    /// `hold_timeout_secs`); none with `on_timeout = "wait"`, which has no deadline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_secs: Option<u64>,
    /// For ask: what applies at the deadline (`wait`: there is none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<OnTimeout>,
    /// What the test could not know, or took as given, where it matters for this action.
    pub notes: Vec<String>,
}

impl Tester {
    /// Compiles `rules` (named `path` in errors) for an agent whose `[agent]` is `agent` (its
    /// default deadline and mode apply). A binary that is not on this host is named by its
    /// path.
    pub fn new(
        rules: &[RuleConfig],
        path: &Path,
        agent: &AgentSection,
    ) -> Result<Self, ConfigError> {
        // The host names in `connect` stand for what they resolve to here, now.
        let resolved = Policy::names_in(rules)
            .into_iter()
            .map(|name| {
                use std::net::ToSocketAddrs;
                let addrs = (name.as_str(), 0)
                    .to_socket_addrs()
                    .map(|a| a.map(|sa| sa.ip()).collect())
                    .unwrap_or_default();
                (name, addrs)
            })
            .collect();
        Self::new_resolved(rules, path, agent, &resolved)
    }

    /// [`Tester::new`] with the names' addresses given (the running agent's, which follow
    /// their TTLs).
    pub fn new_resolved(
        rules: &[RuleConfig],
        path: &Path,
        agent: &AgentSection,
        resolved: &crate::policy::Resolved,
    ) -> Result<Self, ConfigError> {
        let mut keys = Keys::default();
        let policy = Policy::compile_full(rules, path, |p| Ok(keys.key(p)), resolved)?;
        Ok(Self {
            policy,
            keys,
            hold_timeout_secs: agent.hold_timeout_secs,
            mode: agent.mode,
            hold_all_execs: agent.hold_all_execs,
        })
    }

    /// What the rules decide for `action` by `account` (none: an account no rule lists).
    pub fn explain(&mut self, action: &Action, account: Option<&str>) -> Explanation {
        // An empty name is in no rule's `accounts`: only rules for every account apply.
        let accounts = [account.unwrap_or("")];
        let mut notes = Vec::new();
        let (rule, held) = match action {
            Action::Exec {
                program,
                args,
                self_made,
                interpreters,
                given,
                found,
            } => {
                let subject = self.exec_subject(program, args, *self_made, interpreters);
                let held = self.hold_all_execs
                    || self.policy.rules.iter().any(|r| match &r.matcher {
                        Matcher::Exec {
                            files,
                            all,
                            self_made: for_self_made,
                            ..
                        } => {
                            *all || (*for_self_made && subject.self_made)
                                || subject.identities.iter().any(|i| files.contains(&i.key))
                        }
                        Matcher::Connect { .. } => false,
                    });
                self.exec_notes(
                    &mut notes,
                    (given, program, found),
                    *self_made,
                    interpreters,
                    held,
                );
                (
                    pick(
                        self.policy.matches_exec(&subject, &accounts),
                        self.mode,
                        &mut notes,
                    ),
                    held,
                )
            }
            Action::Connect {
                address,
                port,
                protocol,
                ..
            } => {
                // The kernel sees an IPv4-mapped address as the IPv4 one.
                let plain = display_addr(to_v6(*address).octets());
                let held = self.policy.rules.iter().any(|r| match &r.matcher {
                    Matcher::Connect { nets, ports, .. } => {
                        (ports.is_empty() || ports.contains(port))
                            && nets
                                .iter()
                                .any(|n| n.contains(address) || n.contains(&plain))
                    }
                    Matcher::Exec { .. } => false,
                });
                (
                    pick(
                        self.policy.matches_connect(
                            *address,
                            *port,
                            protocol.sock_type(),
                            &accounts,
                        ),
                        self.mode,
                        &mut notes,
                    ),
                    held,
                )
            }
        };
        if account.is_none() {
            let listing: Vec<&str> = self
                .policy
                .rules
                .iter()
                .filter(|r| !r.config.accounts.is_empty())
                .map(|r| r.config.name.as_str())
                .collect();
            if !listing.is_empty() {
                notes.push(format!(
                    "no account given: rules that list accounts ({}) were not tried",
                    listing.join(", ")
                ));
            }
        }
        let decider = rule.map(|r| Decider {
            name: r.config.name.clone(),
            position: self
                .policy
                .rules
                .iter()
                .position(|x| std::ptr::eq(x, r))
                .map_or(0, |i| i + 1),
            decision: r.config.decision,
            description: r.config.description.clone(),
            risk: r.config.risk.clone(),
        });
        let decision = rule.map_or(Decision::Allow, |r| r.config.decision);
        let (deadline_secs, on_timeout) = match rule {
            Some(r) if r.config.decision == Decision::Ask => (
                (r.config.on_timeout != OnTimeout::Wait)
                    .then(|| r.config.timeout_secs.unwrap_or(self.hold_timeout_secs)),
                Some(r.config.on_timeout),
            ),
            _ => (None, None),
        };
        let observe = rule.is_some_and(|r| r.config.mode.unwrap_or(self.mode) == Mode::Observe);
        Explanation {
            action: action.clone(),
            account: account.map(str::to_owned),
            rule: decider,
            decision,
            observe,
            held,
            deadline_secs,
            on_timeout,
            notes,
        }
    }

    /// The exec as the agent would see it: the program with its arguments, and for a script,
    /// each interpreter (the one the kernel runs gets every argument after argv[0]).
    fn exec_subject(
        &mut self,
        program: &Path,
        args: &[String],
        self_made: bool,
        interpreters: &[PathBuf],
    ) -> ExecSubject {
        let mut identities = vec![Identity {
            key: self.keys.key(program),
            args: args.to_vec(),
            args_known: true,
        }];
        // binfmt_script: [interpreter, its #! argument, the file it runs, that file's argv[1..]].
        let mut argv: Vec<String> = std::iter::once(program.display().to_string())
            .chain(args.iter().cloned())
            .collect();
        let mut file = program.to_owned();
        for (level, interpreter) in interpreters.iter().enumerate() {
            let arg = shebang(&file).and_then(|(_, a)| a);
            let mut next = vec![interpreter.display().to_string()];
            next.extend(arg);
            next.extend(argv);
            argv = next;
            file = interpreter.clone();
            let last = level + 1 == interpreters.len();
            identities.push(Identity {
                key: self.keys.key(interpreter),
                args: argv[1..].to_vec(),
                // As in the agent: only the one the kernel runs has arguments it can tell apart.
                args_known: last,
            });
        }
        ExecSubject {
            identities,
            self_made,
            cut: false,
            unchecked: false,
        }
    }

    /// What the test took as given about an exec, where it matters: `held` says whether a
    /// rule names the program.
    fn exec_notes(
        &self,
        notes: &mut Vec<String>,
        (given, program, found): (&str, &Path, &Found),
        self_made: bool,
        interpreters: &[PathBuf],
        held: bool,
    ) {
        match found {
            Found::Rule { rule } => notes.push(format!(
                "{given} is not in PATH here: tested as {}, the program rule {rule:?} names",
                program.display()
            )),
            _ if !program.exists() => notes.push(format!(
                "{} is not on this host: matched by its path only",
                program.display()
            )),
            _ => {}
        }
        if !interpreters.is_empty() {
            notes.push(format!(
                "{} is a script: matched as itself and as run by {}",
                program.display(),
                interpreters
                    .iter()
                    .map(|i| i.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", then ")
            ));
        }
        let missing: Vec<String> = self
            .keys
            .made_up
            .keys()
            .filter(|p| *p != program)
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            let mut missing = missing;
            missing.sort();
            notes.push(format!(
                "not on this host, so matched by path only: {}",
                missing.join(", ")
            ));
        }
        if !self_made && self.policy.has_self_made_rule() {
            notes.push(format!(
                "tested as a file the account did not make; a copy, download or build of its own is matched by the {SELF_MADE} rules (test that with the self-made option)"
            ));
        }
        // A copy only matters for a program no rule names: a copy of one is held as it.
        if !held && !self.policy.binaries.is_empty() {
            notes.push(
                "a byte-for-byte copy of a binary a rule names is held as that binary (the agent compares SHA-256 when it runs); test the binary's own path for it"
                    .to_owned(),
            );
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "action:    {}", self.action)?;
        if let Action::Exec {
            given,
            found: Found::SearchPath,
            program,
            ..
        } = &self.action
        {
            writeln!(
                f,
                "           ({given} found in PATH: {})",
                program.display()
            )?;
        }
        writeln!(
            f,
            "account:   {}",
            self.account
                .as_deref()
                .unwrap_or("(none given: an account no rule lists)")
        )?;
        match &self.rule {
            Some(r) => {
                write!(f, "rule:      {} (rule {}", r.name, r.position)?;
                if !r.risk.is_empty() {
                    write!(f, ", risk {}", r.risk)?;
                }
                writeln!(f, ")")?;
                if !r.description.is_empty() {
                    writeln!(f, "           {}", r.description)?;
                }
            }
            None => writeln!(f, "rule:      none matches in full")?,
        }
        let what = match (self.decision, &self.rule, self.held) {
            (Decision::Allow, None, true) => {
                "the kernel holds it (a rule names it) and the agent resumes it at once: no rule matches in full".to_owned()
            }
            (Decision::Allow, None, false) => "not held: no rule names it".to_owned(),
            (Decision::Allow, Some(_), _) => "held, then resumed by the rule without asking".to_owned(),
            (Decision::Deny, _, _) => match self.action {
                Action::Exec { .. } => "held, then killed without asking".to_owned(),
                Action::Connect { .. } => {
                    "held, then refused (or the task killed, as the rule's on_deny says) without asking".to_owned()
                }
            },
            (Decision::Ask, _, _) => match (self.on_timeout, self.deadline_secs) {
                (Some(OnTimeout::Wait), _) | (_, None) => {
                    "held until approved or denied, however long that takes (on_timeout = wait)"
                        .to_owned()
                }
                (on_timeout, Some(secs)) => format!(
                    "held until approved or denied; after {secs} s: {} (on_timeout)",
                    if on_timeout == Some(OnTimeout::Allow) {
                        "allow"
                    } else {
                        "deny"
                    }
                ),
            },
        };
        if self.observe {
            let d = decision_word(self.decision);
            writeln!(
                f,
                "decision:  {d} (observe mode: the action runs, and its request records {d} as what would have happened)"
            )?;
        } else {
            writeln!(f, "decision:  {}: {what}", decision_word(self.decision))?;
        }
        for n in &self.notes {
            writeln!(f, "note:      {n}")?;
        }
        Ok(())
    }
}

/// Labels as `key=value` (the form `--label` takes).
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE, like env=prod")),
    }
}

/// `base` with `extra` added over it (an `extra` key replaces the same key of `base`).
pub fn merge_labels(
    base: &BTreeMap<String, String>,
    extra: &[(String, String)],
) -> BTreeMap<String, String> {
    let mut out = base.clone();
    out.extend(extra.iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::config::Config;

    fn rules(text: &str) -> Vec<RuleConfig> {
        Config::parse(text, Path::new("t.toml")).unwrap().rules
    }

    fn tester(rules: &[RuleConfig]) -> Tester {
        Tester::new(rules, Path::new("t.toml"), &AgentSection::default()).unwrap()
    }

    /// `line` as an exec, with no PATH to search.
    fn exec(line: &str, rules: &[RuleConfig]) -> Action {
        Action::exec_in(line, false, rules, &[], Path::new("/")).unwrap()
    }

    const SH: &str = "[[rule]]\nname = \"sh-delete\"\nexec = [\"/bin/sh\"]\nargs = [\"* delete *\"]\ndecision = \"ask\"\ntimeout_secs = 300\n[[rule]]\nname = \"db\"\nconnect = [\"10.20.0.0/16\", \"2001:db8::/32\"]\nports = [5432]\nprotocol = \"tcp\"\ndecision = \"deny\"\n";

    #[test]
    fn held_but_matched_by_no_rule_in_full_is_allowed_at_once() {
        let r = rules(SH);
        let mut t = tester(&r);
        let e = t.explain(&exec("/bin/sh -n prod delete ns x", &r), Some("ci"));
        assert_eq!(e.decision, Decision::Ask);
        assert_eq!(e.rule.as_ref().map(|r| r.name.as_str()), Some("sh-delete"));
        assert_eq!(
            (e.deadline_secs, e.on_timeout),
            (Some(300), Some(OnTimeout::Deny))
        );
        assert_eq!(exit_code(e.decision), EXIT_ASK);
        let e = t.explain(&exec("/bin/sh get pods", &r), Some("ci"));
        assert_eq!((e.decision, e.held), (Decision::Allow, true));
        assert!(e.rule.is_none());
        assert!(e.to_string().contains("resumes it at once"), "{e}");
        let e = t.explain(&exec("/usr/bin/env delete x", &r), Some("ci"));
        assert_eq!((e.decision, e.held), (Decision::Allow, false));
        assert_eq!(exit_code(e.decision), EXIT_ALLOW);
    }

    #[test]
    fn connects_match_address_port_and_protocol() {
        let r = rules(SH);
        let mut t = tester(&r);
        let deny = |d: &str, p: Transport, t: &mut Tester| {
            t.explain(&Action::connect(d, p).unwrap(), None).decision
        };
        assert_eq!(
            deny("10.20.3.4:5432", Transport::Tcp, &mut t),
            Decision::Deny
        );
        assert_eq!(exit_code(Decision::Deny), EXIT_DENY);
        assert_eq!(
            deny("[2001:db8::5]:5432", Transport::Tcp, &mut t),
            Decision::Deny
        );
        assert_eq!(
            deny("[::ffff:10.20.3.4]:5432", Transport::Tcp, &mut t),
            Decision::Deny,
            "IPv4-mapped is the IPv4 address"
        );
        assert_eq!(
            deny("10.20.3.4:5432", Transport::Udp, &mut t),
            Decision::Allow
        );
        assert_eq!(
            deny("10.20.3.4:5433", Transport::Tcp, &mut t),
            Decision::Allow
        );
        assert_eq!(
            deny("10.21.0.1:5432", Transport::Tcp, &mut t),
            Decision::Allow
        );
        let e = t.explain(
            &Action::connect("10.20.3.4:5432", Transport::Udp).unwrap(),
            None,
        );
        assert!(
            e.held,
            "the kernel holds by address and port, then the protocol decides"
        );
    }

    #[test]
    fn bad_destinations_say_what_is_wrong() {
        assert!(matches!(
            Action::connect("db.invalid:5432", Transport::Tcp),
            Err(ActionError::Name { .. })
        ));
        for bad in ["10.0.0.1", "10.0.0.1:99999", "2001:db8::1:5432", ""] {
            assert_eq!(
                Action::connect(bad, Transport::Tcp),
                Err(ActionError::Destination(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_bare_name_is_looked_up_in_path_then_among_the_rules() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("airlock-tool");
        std::fs::write(&tool, b"\x7fELF").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let r = rules(
            "[[rule]]\nname = \"t\"\nexec = [\"/opt/none/airlock-tool\"]\ndecision = \"deny\"\n",
        );
        let search = [dir.path().to_owned()];
        let a = Action::exec_in("airlock-tool x", false, &r, &search, Path::new("/")).unwrap();
        assert!(
            matches!(&a, Action::Exec { program, found: Found::SearchPath, .. } if *program == tool),
            "{a:?}"
        );
        let mut t = tester(&r);
        assert_eq!(
            t.explain(&a, None).decision,
            Decision::Allow,
            "the airlock-tool in PATH is not the one the rule names"
        );
        let a = Action::exec_in("airlock-tool x", false, &r, &[], Path::new("/")).unwrap();
        assert!(matches!(&a, Action::Exec { found: Found::Rule { rule }, .. } if rule == "t"));
        let e = t.explain(&a, None);
        assert_eq!(e.decision, Decision::Deny);
        assert!(
            e.notes.iter().any(|n| n.contains("not in PATH here")),
            "{e}"
        );
        assert_eq!(
            Action::exec_in("nope x", false, &r, &[], Path::new("/")),
            Err(ActionError::NotFound {
                program: "nope".into()
            })
        );
        let a = Action::exec_in("bin/x", false, &r, &[], Path::new("/work")).unwrap();
        assert!(
            matches!(&a, Action::Exec { program, found: Found::Given, .. } if program == Path::new("/work/bin/x"))
        );
        assert_eq!(
            Action::exec_in("  ", false, &r, &[], Path::new("/")),
            Err(ActionError::Empty)
        );
    }

    #[test]
    fn another_path_to_a_rule_binary_matches_as_in_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("kubectl");
        std::os::unix::fs::symlink("/bin/sh", &link).unwrap();
        let r = rules(SH);
        let mut t = tester(&r);
        let line = format!("{} delete ns x", link.display());
        let e = t.explain(&exec(&line, &r), Some("ci"));
        assert_eq!(e.decision, Decision::Ask, "{e}");
    }

    #[test]
    fn a_script_is_matched_as_itself_and_through_its_interpreter() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("deploy.sh");
        std::fs::write(&script, "#!/bin/sh -e\necho deploying\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The interpreter's arguments are its #! argument, the script, then the script's own.
        let by_interpreter = rules(
            "[[rule]]\nname = \"sh-e\"\nexec = [\"/bin/sh\"]\nargs = [\"-e * prod\"]\ndecision = \"ask\"\n",
        );
        let line = format!("{} prod", script.display());
        let a = exec(&line, &by_interpreter);
        assert!(
            matches!(&a, Action::Exec { interpreters, .. } if interpreters == &[PathBuf::from("/bin/sh")]),
            "{a:?}"
        );
        let e = tester(&by_interpreter).explain(&a, None);
        assert_eq!(e.decision, Decision::Ask, "{e}");
        assert!(e.notes.iter().any(|n| n.contains("is a script")), "{e}");
        let by_script = rules(&format!(
            "[[rule]]\nname = \"deploy\"\nexec = [\"{}\"]\nargs = [\"prod\"]\ndecision = \"deny\"\n",
            script.display()
        ));
        let e = tester(&by_script).explain(&exec(&line, &by_script), None);
        assert_eq!(e.decision, Decision::Deny, "its own arguments: {e}");
    }

    #[test]
    fn accounts_and_self_made_files_are_as_given() {
        let r = rules(
            "[[rule]]\nname = \"ci\"\naccounts = [\"ci\"]\nexec = [\"/bin/sh\"]\ndecision = \"deny\"\n[[rule]]\nname = \"own\"\nexec = [\"@self-made\"]\ndecision = \"ask\"\n",
        );
        let mut t = tester(&r);
        let sh = exec("/bin/sh", &r);
        assert_eq!(t.explain(&sh, Some("ci")).decision, Decision::Deny);
        assert_eq!(t.explain(&sh, Some("claude")).decision, Decision::Allow);
        let e = t.explain(&sh, None);
        assert_eq!(e.decision, Decision::Allow);
        assert!(
            e.notes.iter().any(|n| n.contains("(ci) were not tried")),
            "{e}"
        );
        assert!(e.notes.iter().any(|n| n.contains("@self-made")), "{e}");
        let made = Action::exec_in("/tmp/x", true, &r, &[], Path::new("/")).unwrap();
        let e = t.explain(&made, Some("claude"));
        assert_eq!((e.decision, e.held), (Decision::Ask, true));
    }

    #[test]
    fn observe_mode_and_waiting_are_said() {
        let r = rules(
            "[[rule]]\nname = \"watch\"\nexec = [\"/bin/sh\"]\nargs = [\"watch *\"]\ndecision = \"deny\"\nmode = \"observe\"\n[[rule]]\nname = \"wait\"\nexec = [\"/bin/sh\"]\nargs = [\"run *\"]\ndecision = \"ask\"\non_timeout = \"wait\"\n[[rule]]\nname = \"guard\"\nexec = [\"/bin/sh\"]\nargs = [\"watch prod\"]\ndecision = \"ask\"\n",
        );
        let mut t = tester(&r);
        // An observe rule first does not let through what an enforcing rule after it holds.
        let e = t.explain(&exec("/bin/sh watch prod", &r), None);
        assert_eq!((e.decision, e.observe), (Decision::Ask, false));
        assert_eq!(e.rule.as_ref().map(|d| d.name.as_str()), Some("guard"));
        assert!(e.notes.iter().any(|n| n.contains("only observes")), "{e}");
        let e = t.explain(&exec("/bin/sh watch x", &r), None);
        assert_eq!((e.decision, e.observe), (Decision::Deny, true));
        assert!(
            e.to_string().contains("observe mode: the action runs"),
            "{e}"
        );
        let e = t.explain(&exec("/bin/sh run", &r), None);
        assert_eq!((e.decision, e.observe), (Decision::Ask, false));
        assert_eq!(
            (e.deadline_secs, e.on_timeout),
            (None, Some(OnTimeout::Wait))
        );
        assert!(e.to_string().contains("however long that takes"), "{e}");
        // agent.mode applies to rules that set none.
        let observing = AgentSection {
            mode: Mode::Observe,
            ..AgentSection::default()
        };
        let mut t = Tester::new(&r, Path::new("t.toml"), &observing).unwrap();
        assert!(t.explain(&exec("/bin/sh run", &r), None).observe);
        // agent.hold_all_execs: the kernel holds what no rule names too.
        let all = AgentSection {
            hold_all_execs: true,
            ..AgentSection::default()
        };
        let env = exec("/usr/bin/env", &r);
        assert!(!tester(&r).explain(&env, None).held);
        let mut t = Tester::new(&r, Path::new("t.toml"), &all).unwrap();
        assert!(t.explain(&env, None).held);
    }

    #[test]
    fn json_names_the_rule_decision_and_deadline() {
        let r = rules(SH);
        let e = tester(&r).explain(&exec("/bin/sh delete x", &r), Some("ci"));
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["decision"], "ask");
        assert_eq!(v["rule"]["name"], "sh-delete");
        assert_eq!(v["rule"]["position"], 1);
        assert_eq!(v["deadline_secs"], 300);
        assert_eq!(v["on_timeout"], "deny");
        assert_eq!(v["action"]["kind"], "exec");
        assert_eq!(v["action"]["args"][0], "delete");
        assert_eq!(v["account"], "ci");
    }

    #[test]
    fn labels_are_key_value() {
        assert_eq!(parse_label("env=prod"), Ok(("env".into(), "prod".into())));
        assert!(parse_label("env").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_label("=prod").is_err());
        let base = [("env".to_owned(), "staging".to_owned())].into();
        let merged = merge_labels(&base, &[("env".into(), "prod".into())]);
        assert_eq!(merged["env"], "prod");
    }
}
