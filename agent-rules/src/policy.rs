//! Rule matching: which rule governs a held exec, mapping or connect, and the kernel prefilter
//! tables (binaries by device and inode, destination prefixes and ports) derived from the rules.
//!
//! Semantics: rules are tried in file order and the first whose account, action, arguments and
//! destination match decides. An action the kernel held that no rule matches in full (say
//! `kubectl get` under a `kubectl delete *` rule) is allowed at once.
//!
//! An exec is matched by every identity it has: the program the kernel runs (for a script, its
//! interpreter), the file the exec named (the script), and, for a copy of a binary a rule names
//! (same SHA-256), that binary. `exec = ["@self-made"]` matches execs of files the account
//! could have made (owned or writable by it).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
};

use agent_common::FileKey;
use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    argmatch::ArgPattern,
    config::{ConfigError, ConnectDeny, ProtocolFilter, RuleConfig},
    identity::{Hasher, Sha256Sum},
};

pub use crate::identity::file_key;

/// The `exec` entry that names files the watched account could have made.
pub const SELF_MADE: &str = "@self-made";

/// What a rule decides.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Resume the task.
    Allow,
    /// Kill the exec or refuse the connect.
    Deny,
    /// Hold and ask the decider.
    #[serde(alias = "approve")]
    Ask,
}

/// The action side of a compiled rule.
#[derive(Debug)]
pub enum Matcher {
    /// Exec of one of these files (empty with `all`: every exec), arguments matching `args`.
    Exec {
        /// Resolved binaries.
        files: Vec<FileKey>,
        /// `exec = ["*"]`.
        all: bool,
        /// `exec = ["@self-made"]`.
        self_made: bool,
        /// Argument patterns (any one must match); `None`: any arguments.
        args: Option<Vec<ArgPattern>>,
    },
    /// Connect to one of `nets`, on `ports` (empty: any), with `protocol`.
    Connect {
        /// Destination networks.
        nets: Vec<IpNet>,
        /// Destination ports.
        ports: Vec<u16>,
        /// Transport.
        protocol: ProtocolFilter,
    },
}

/// A rule ready for matching.
#[derive(Debug)]
pub struct Rule {
    /// The rule as written.
    pub config: RuleConfig,
    /// Compiled action matcher.
    pub matcher: Matcher,
}

/// A binary some rule names.
#[derive(Debug, Clone)]
pub struct Binary {
    /// Its path, as the rule wrote it.
    pub path: PathBuf,
    /// Its identity.
    pub key: FileKey,
}

/// The addresses each DNS name in `connect` stands for now (the agent's resolver keeps them,
/// with the ones a name had until they expire); names are lower-case, without a final dot.
pub type Resolved = BTreeMap<String, Vec<IpAddr>>;

/// All rules of the agent, compiled.
#[derive(Debug, Default)]
pub struct Policy {
    /// In file order.
    pub rules: Vec<Rule>,
    /// Every binary the rules name, in rule order (the first path wins for one identity).
    pub binaries: Vec<Binary>,
    /// For each address a name stood for, the name (the first rule's), shown to approvers.
    pub names_by_addr: HashMap<Ipv6Addr, String>,
}

/// Whether `text` is a DNS host name (letters, digits and dashes in dot-separated labels of
/// at most 63 characters, 253 in all; a final dot allowed), as `connect` takes beside CIDRs.
pub fn is_host_name(text: &str) -> bool {
    let name = text.strip_suffix('.').unwrap_or(text);
    !name.is_empty()
        && name.len() <= 253
        && name.parse::<IpAddr>().is_err()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        // A last label of digits only is an address someone mistyped, not a name.
        && !name.rsplit('.').next().is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
}

/// The canonical form of a host name in `connect`: lower-case, without a final dot.
pub fn canonical_name(text: &str) -> String {
    text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase()
}

/// One identity of a program, with the arguments it was given as that program.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The file.
    pub key: FileKey,
    /// Its arguments (after the program).
    pub args: Vec<String>,
    /// Whether `args` are known to be its own (false: the program's place in the command line
    /// could not be told).
    pub args_known: bool,
}

/// An exec (or executable mapping) as matching sees it.
#[derive(Debug, Clone, Default)]
pub struct ExecSubject {
    /// Every identity the program has (run file, named file, interpreters between, the binary
    /// it is a copy of), each with its arguments.
    pub identities: Vec<Identity>,
    /// Whether the account could have made the file.
    pub self_made: bool,
    /// The command line could not be read whole: no arguments are known.
    pub cut: bool,
    /// A file the account made could not be checked: it counts as a copy of every binary a
    /// rule names.
    pub unchecked: bool,
}

/// Kernel prefilter tables derived from a [`Policy`].
#[derive(Debug, Default, PartialEq)]
pub struct KernelTables {
    /// Held binaries and the rules (bit per rule index) naming them.
    pub exec_files: HashMap<FileKey, u64>,
    /// Whether some rule covers every exec.
    pub hold_all_execs: bool,
    /// Destination prefixes as (prefix length over IPv6, address, rule mask). IPv4 networks are
    /// mapped into `::ffff:0:0/96`. Each mask includes the masks of every shorter prefix that
    /// contains it, because an LPM lookup returns only the longest match.
    pub nets: Vec<(u32, [u8; 16], u64)>,
    /// Ports and the rules naming them.
    pub ports: HashMap<u16, u64>,
    /// Rules that cover every port.
    pub any_port_mask: u64,
}

/// Maps an address to the IPv6 form the kernel side uses.
pub fn to_v6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The address as people write it: IPv4-mapped IPv6 is shown as IPv4.
pub fn display_addr(raw: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(raw);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn net_v6(net: &IpNet) -> (u32, [u8; 16]) {
    match net {
        IpNet::V4(n) => (
            96 + u32::from(n.prefix_len()),
            n.network().to_ipv6_mapped().octets(),
        ),
        IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
    }
}

/// `addr` with every bit after the first `len` cleared.
fn truncate(addr: [u8; 16], len: u32) -> [u8; 16] {
    let a = u128::from_be_bytes(addr);
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    (a & mask).to_be_bytes()
}

fn contains(outer: (u32, [u8; 16]), inner: (u32, [u8; 16])) -> bool {
    if outer.0 > inner.0 {
        return false;
    }
    let a = u128::from_be_bytes(outer.1);
    let b = u128::from_be_bytes(inner.1);
    let mask = if outer.0 == 0 {
        0
    } else {
        u128::MAX << (128 - outer.0)
    };
    a & mask == b & mask
}

impl Policy {
    /// Compiles rules; `path` is named in errors.
    pub fn compile(rules: &[RuleConfig], path: &Path) -> Result<Self, ConfigError> {
        Self::compile_with(rules, path, file_key)
    }

    /// Compiles rules as the agent does, a DNS name in `connect` standing for the addresses
    /// `resolved` gives it (none yet: the name holds nothing until it resolves).
    pub fn compile_resolved(
        rules: &[RuleConfig],
        path: &Path,
        resolved: &Resolved,
    ) -> Result<Self, ConfigError> {
        Self::compile_full(rules, path, file_key, resolved)
    }

    /// Every DNS name the rules' `connect` lists, canonical.
    pub fn names_in(rules: &[RuleConfig]) -> std::collections::BTreeSet<String> {
        rules
            .iter()
            .flat_map(|r| r.connect.iter())
            .filter(|c| is_host_name(c))
            .map(|c| canonical_name(c))
            .collect()
    }

    /// The name a rule gave `addr`, if it stands for one.
    pub fn name_of(&self, addr: IpAddr) -> Option<&str> {
        self.names_by_addr.get(&to_v6(addr)).map(String::as_str)
    }

    /// Compiles rules, naming each rule binary by `key_of` (the agent: [`file_key`], device
    /// and inode as the kernel sees them; the rule tester also names binaries that are not on
    /// this host, by their path). A binary `key_of` fails on is left out of its rule.
    pub fn compile_with(
        rules: &[RuleConfig],
        path: &Path,
        key_of: impl FnMut(&Path) -> std::io::Result<FileKey>,
    ) -> Result<Self, ConfigError> {
        Self::compile_full(rules, path, key_of, &Resolved::new())
    }

    /// [`Policy::compile_with`] with the addresses of the names in `connect`.
    pub fn compile_full(
        rules: &[RuleConfig],
        path: &Path,
        mut key_of: impl FnMut(&Path) -> std::io::Result<FileKey>,
        resolved: &Resolved,
    ) -> Result<Self, ConfigError> {
        let mut names_by_addr = HashMap::new();
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut out = Vec::with_capacity(rules.len());
        let mut binaries: Vec<Binary> = Vec::new();
        for rule in rules {
            let matcher = if !rule.exec.is_empty() {
                let all = rule.exec.iter().any(|e| e == "*");
                let self_made = rule.exec.iter().any(|e| e == SELF_MADE);
                let mut files = Vec::new();
                for bin in rule.exec.iter().filter(|e| *e != "*" && *e != SELF_MADE) {
                    if !bin.starts_with('/') {
                        return Err(invalid(format!(
                            "rule {:?}: exec {bin:?} must be an absolute path, \"*\" or \"{SELF_MADE}\"",
                            rule.name
                        )));
                    }
                    match key_of(Path::new(bin)) {
                        Ok(key) => {
                            files.push(key);
                            if !binaries.iter().any(|b| b.key == key) {
                                binaries.push(Binary {
                                    path: PathBuf::from(bin),
                                    key,
                                });
                            }
                        }
                        // A binary not installed on this host cannot be run here either; the
                        // agent watches its path and loads it when it appears.
                        Err(e) => {
                            tracing::warn!(rule = %rule.name, binary = %bin, error = %e, "binary not found; rule skips it until it appears")
                        }
                    }
                }
                let args = if rule.args.is_empty() {
                    None
                } else {
                    let patterns = rule
                        .args
                        .iter()
                        .map(|p| ArgPattern::parse(p))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| invalid(format!("rule {:?}: args {e}", rule.name)))?;
                    Some(patterns)
                };
                Matcher::Exec {
                    files,
                    all,
                    self_made,
                    args,
                }
            } else {
                let mut nets = Vec::new();
                for cidr in &rule.connect {
                    if is_host_name(cidr) {
                        let name = canonical_name(cidr);
                        for a in resolved.get(&name).into_iter().flatten() {
                            names_by_addr
                                .entry(to_v6(*a))
                                .or_insert_with(|| name.clone());
                            nets.push(IpNet::from(*a));
                        }
                        continue;
                    }
                    let net = cidr
                        .parse::<IpNet>()
                        .or_else(|_| cidr.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| {
                            invalid(format!(
                                "rule {:?}: connect {cidr:?} is not an address, a CIDR or a host name (like 10.0.0.0/8, 2001:db8::/32 or orders-db.prod.internal)",
                                rule.name
                            ))
                        })?;
                    nets.push(net.trunc());
                }
                Matcher::Connect {
                    nets,
                    ports: rule.ports.clone(),
                    protocol: rule.protocol,
                }
            };
            out.push(Rule {
                config: rule.clone(),
                matcher,
            });
        }
        Ok(Self {
            rules: out,
            binaries,
            names_by_addr,
        })
    }

    /// Whether some rule names self-made files.
    pub fn has_self_made_rule(&self) -> bool {
        self.rules.iter().any(|r| {
            matches!(
                r.matcher,
                Matcher::Exec {
                    self_made: true,
                    ..
                }
            )
        })
    }

    /// Whether some rule names an exec at all (copies of named binaries are then looked for).
    pub fn names_binaries(&self) -> bool {
        !self.binaries.is_empty() || self.has_self_made_rule()
    }

    /// The path a rule gives the binary `key`, if a rule names it.
    pub fn binary_path(&self, key: &FileKey) -> Option<&Path> {
        self.binaries
            .iter()
            .find(|b| b.key == *key)
            .map(|b| b.path.as_path())
    }

    /// The first rule binary (in rule order) that a file of `size` bytes with the digest `sum`
    /// is a copy of. Only binaries of the same size are hashed, when first needed (not at load:
    /// a large binary takes a while), and `hasher` keeps the sums until the files change.
    pub fn copy_of(&self, sum: &Sha256Sum, size: u64, hasher: &Hasher) -> Option<&Binary> {
        let same_size = |b: &&Binary| std::fs::metadata(&b.path).is_ok_and(|m| m.len() == size);
        self.binaries.iter().filter(same_size).find(|b| match hasher.sum(&b.path) {
            Ok(s) => s == *sum,
            Err(e) => {
                tracing::warn!(binary = %b.path.display(), error = %e, "cannot hash; its copies are not recognised");
                false
            }
        })
    }

    /// The rule governing an exec (or executable mapping) `subject` of `accounts` (the task's
    /// account, and the watched account it descends from).
    ///
    /// A rule applies when one of the program's identities is a file it names (or it names
    /// every exec, or self-made files and this is one) and that identity's arguments match.
    /// Arguments that are not known (cut, or the program's place not found) match every
    /// pattern of an ask or deny rule and no pattern of an allow rule: unknown arguments never
    /// let anything through.
    pub fn match_exec(&self, subject: &ExecSubject, accounts: &[&str]) -> Option<&Rule> {
        self.matches_exec(subject, accounts).next()
    }

    /// Every rule that matches the exec, in order (the first decides; an observe-mode rule
    /// first lets the agent find the enforcing one after it).
    pub fn matches_exec<'a, 's, 'c>(
        &'a self,
        subject: &'s ExecSubject,
        accounts: &'c [&'c str],
    ) -> impl Iterator<Item = &'a Rule> + use<'a, 's, 'c> {
        self.rules
            .iter()
            .filter(|r| accounts.iter().any(|a| r.applies_to(a)))
            .filter(move |rule| {
                let Matcher::Exec {
                    files,
                    all,
                    self_made,
                    args,
                } = &rule.matcher
                else {
                    return false;
                };
                let names = |key: &FileKey| {
                    *all || (*self_made && subject.self_made)
                        || files.contains(key)
                        || (subject.unchecked && !files.is_empty())
                };
                subject.identities.iter().any(|id| {
                    names(&id.key)
                        && match args {
                            None => true,
                            Some(_) if subject.cut || !id.args_known => {
                                rule.config.decision != Decision::Allow
                            }
                            Some(patterns) => patterns.iter().any(|p| p.matches(&id.args)),
                        }
                })
            })
    }

    /// The rule governing a connect to `addr`:`port` over a socket of type `sock_type`
    /// (1 stream, 2 datagram) by `accounts` (as for [`Policy::match_exec`]).
    pub fn match_connect(
        &self,
        addr: IpAddr,
        port: u16,
        sock_type: u32,
        accounts: &[&str],
    ) -> Option<&Rule> {
        self.matches_connect(addr, port, sock_type, accounts).next()
    }

    /// Every rule that matches the connect, in order (as [`Policy::matches_exec`]).
    pub fn matches_connect<'a, 'c>(
        &'a self,
        addr: IpAddr,
        port: u16,
        sock_type: u32,
        accounts: &'c [&'c str],
    ) -> impl Iterator<Item = &'a Rule> + use<'a, 'c> {
        let v6 = to_v6(addr);
        self.rules
            .iter()
            .filter(|r| accounts.iter().any(|a| r.applies_to(a)))
            .filter(move |rule| match &rule.matcher {
                Matcher::Connect {
                    nets,
                    ports,
                    protocol,
                } => {
                    // Stream-like sockets (SCTP, DCCP) count as TCP: held like it.
                    let proto_ok = match protocol {
                        ProtocolFilter::Any => true,
                        ProtocolFilter::Tcp => sock_type != 2,
                        ProtocolFilter::Udp => sock_type == 2,
                    };
                    proto_ok
                        && (ports.is_empty() || ports.contains(&port))
                        && nets.iter().any(|n| contains(net_v6(n), (128, v6.octets())))
                }
                Matcher::Exec { .. } => false,
            })
    }

    /// The kernel prefilter tables for these rules.
    pub fn kernel_tables(&self) -> KernelTables {
        let mut t = KernelTables::default();
        let mut prefixes: HashMap<(u32, [u8; 16]), u64> = HashMap::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let bit = 1u64 << i;
            match &rule.matcher {
                Matcher::Exec { files, all, .. } => {
                    t.hold_all_execs |= *all;
                    for f in files {
                        *t.exec_files.entry(*f).or_default() |= bit;
                    }
                }
                Matcher::Connect { nets, ports, .. } => {
                    for n in nets {
                        *prefixes.entry(net_v6(n)).or_default() |= bit;
                    }
                    if ports.is_empty() {
                        t.any_port_mask |= bit;
                    }
                    for p in ports {
                        *t.ports.entry(*p).or_default() |= bit;
                    }
                }
            }
        }
        // Each prefix also carries the rules of every shorter prefix containing it: look up
        // each of its ancestors (at most 128), not every other prefix.
        let mut nets: Vec<_> = prefixes
            .keys()
            .map(|&(len, addr)| {
                let mask = (0..=len)
                    .filter_map(|l| prefixes.get(&(l, truncate(addr, l))))
                    .fold(0, |m, bits| m | bits);
                (len, addr, mask)
            })
            .collect();
        nets.sort();
        t.nets = nets;
        t
    }
}

impl Rule {
    /// Whether the rule covers account `user` (every account when it names none).
    pub fn applies_to(&self, user: &str) -> bool {
        self.config.accounts.is_empty() || self.config.accounts.iter().any(|a| a == user)
    }

    /// What a deny does for this rule's connects.
    pub fn connect_deny(&self) -> ConnectDeny {
        self.config.on_deny
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn policy(text: &str) -> Policy {
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        Policy::compile(&c.rules, Path::new("t.toml")).unwrap()
    }

    /// An exec of `key` with the arguments (after the program) of `args`.
    fn exec(key: FileKey, args: &str) -> ExecSubject {
        ExecSubject {
            identities: vec![Identity {
                key,
                args: args
                    .split(' ')
                    .filter(|a| !a.is_empty())
                    .map(String::from)
                    .collect(),
                args_known: true,
            }],
            ..Default::default()
        }
    }

    fn name<'a>(p: &'a Policy, s: &ExecSubject, user: &str) -> Option<&'a str> {
        p.match_exec(s, &[user]).map(|r| r.config.name.as_str())
    }

    #[test]
    fn first_matching_rule_wins_and_args_are_tokens() {
        let p = policy(
            r#"
[[rule]]
name = "delete"
exec = ["/bin/sh"]
args = ["* delete *"]
decision = "ask"
[[rule]]
name = "rest"
exec = ["/bin/sh"]
decision = "allow"
"#,
        );
        let key = file_key(Path::new("/bin/sh")).unwrap();
        assert_eq!(name(&p, &exec(key, "delete pod x"), "ci"), Some("delete"));
        assert_eq!(
            name(&p, &exec(key, "-n prod delete ns x"), "ci"),
            Some("delete"),
            "flags before the subcommand"
        );
        assert_eq!(name(&p, &exec(key, "get pods"), "ci"), Some("rest"));
        let other = file_key(Path::new("/usr/bin/env")).unwrap();
        assert!(name(&p, &exec(other, "x delete y"), "ci").is_none());
    }

    #[test]
    fn the_readme_example_holds_a_subcommand_after_flags() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.toml"))
                .unwrap();
        let c = Config::parse(&text, Path::new("agent.toml")).unwrap();
        let rule = c
            .rules
            .iter()
            .find(|r| r.name == "kubectl-destructive")
            .expect("the example rule");
        let patterns: Vec<_> = rule
            .args
            .iter()
            .map(|a| ArgPattern::parse(a).unwrap())
            .collect();
        let held = |line: &str| {
            let args: Vec<String> = line.split(' ').map(String::from).collect();
            patterns.iter().any(|p| p.matches(&args))
        };
        assert!(held("delete ns payments"));
        assert!(held("-n payments delete deployment api"));
        assert!(held("--context prod drain node-1"));
        assert!(!held("get pods"));
    }

    #[test]
    fn unknown_arguments_hold_and_never_allow() {
        let p = policy(
            "[[rule]]\nname = \"get\"\nexec = [\"/bin/sh\"]\nargs = [\"get *\"]\ndecision = \"allow\"\n[[rule]]\nname = \"force\"\nexec = [\"/bin/sh\"]\nargs = [\"* --force\"]\ndecision = \"ask\"\n",
        );
        let key = file_key(Path::new("/bin/sh")).unwrap();
        assert_eq!(name(&p, &exec(key, "get pods"), "ci"), Some("get"));
        assert!(name(&p, &exec(key, "delete pod"), "ci").is_none());
        let cut = ExecSubject {
            cut: true,
            ..exec(key, "get pods")
        };
        assert_eq!(
            name(&p, &cut, "ci"),
            Some("force"),
            "what was cut could hide --force, and cannot prove `get`"
        );
    }

    #[test]
    fn rules_for_an_account_follow_it_past_setuid() {
        let p = policy(
            "[[rule]]\nname = \"ci\"\naccounts = [\"ci\"]\nexec = [\"/bin/sh\"]\ndecision = \"ask\"\n",
        );
        let key = file_key(Path::new("/bin/sh")).unwrap();
        assert!(p.match_exec(&exec(key, ""), &["root"]).is_none());
        assert!(
            p.match_exec(&exec(key, ""), &["root", "ci"]).is_some(),
            "ci's task that became root"
        );
    }

    #[test]
    fn any_identity_of_the_program_matches() {
        let p = policy(
            "[[rule]]\nname = \"script\"\nexec = [\"/usr/bin/env\"]\ndecision = \"ask\"\n[[rule]]\nname = \"mine\"\nexec = [\"@self-made\"]\ndecision = \"deny\"\n",
        );
        let interpreter = file_key(Path::new("/bin/sh")).unwrap();
        let script = file_key(Path::new("/usr/bin/env")).unwrap();
        let mut s = exec(interpreter, "");
        s.identities.extend(exec(script, "").identities);
        assert_eq!(name(&p, &s, "ci"), Some("script"), "named by the script");
        let made = ExecSubject {
            self_made: true,
            ..exec(interpreter, "")
        };
        assert_eq!(name(&p, &made, "ci"), Some("mine"));
        assert!(p.has_self_made_rule());
        assert!(name(&p, &exec(interpreter, ""), "ci").is_none());
        let unchecked = ExecSubject {
            unchecked: true,
            ..exec(interpreter, "")
        };
        assert_eq!(
            name(&p, &unchecked, "ci"),
            Some("script"),
            "a file that could not be hashed counts as a copy"
        );
    }

    #[test]
    fn host_names_stand_for_their_resolved_addresses() {
        let c = Config::parse(
            "[[rule]]\nname = \"db\"\nconnect = [\"Orders-DB.prod.internal.\", \"10.9.0.0/16\"]\nports = [5432]\ndecision = \"ask\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let names = Policy::names_in(&c.rules);
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["orders-db.prod.internal"]
        );
        // Not resolved yet: only the CIDR holds.
        let p = Policy::compile_resolved(&c.rules, Path::new("t.toml"), &Resolved::new()).unwrap();
        let ci = ["ci"];
        let a: IpAddr = "10.20.3.4".parse().unwrap();
        assert!(p.match_connect(a, 5432, 1, &ci).is_none());
        let mut r = Resolved::new();
        r.insert("orders-db.prod.internal".into(), vec![a]);
        let p = Policy::compile_resolved(&c.rules, Path::new("t.toml"), &r).unwrap();
        assert!(p.match_connect(a, 5432, 1, &ci).is_some());
        assert!(p.match_connect(a, 5433, 1, &ci).is_none());
        assert_eq!(p.name_of(a), Some("orders-db.prod.internal"));
        assert!(p.name_of("10.9.1.1".parse().unwrap()).is_none());
        let t = p.kernel_tables();
        assert!(t
            .nets
            .iter()
            .any(|(len, addr, _)| *len == 128 && *addr == to_v6(a).octets()));
        for bad in [
            "10.0.0.256",
            "-x.example",
            "a..b",
            "under_score.example",
            "10.1",
        ] {
            assert!(!is_host_name(bad), "{bad}");
        }
        assert!(is_host_name("localhost") && is_host_name("db-1.example.com."));
    }

    #[test]
    fn copies_are_found_by_hash() {
        let c = Config::parse(
            "[[rule]]\nname = \"env\"\nexec = [\"/usr/bin/env\"]\ndecision = \"ask\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let h = Hasher::default();
        let p = Policy::compile(&c.rules, Path::new("t.toml")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("renamed");
        std::fs::copy("/usr/bin/env", &copy).unwrap();
        let size = |f: &Path| std::fs::metadata(f).unwrap().len();
        let sum = h.sum(&copy).unwrap();
        let found = p.copy_of(&sum, size(&copy), &h).expect("a copy");
        assert_eq!(found.path, Path::new("/usr/bin/env"));
        let sh = Path::new("/bin/sh");
        assert!(p.copy_of(&h.sum(sh).unwrap(), size(sh), &h).is_none());
        // Binaries of another size are not hashed at all, so not found even for the right sum.
        assert!(p.copy_of(&sum, size(&copy) + 1, &h).is_none());
    }

    #[test]
    fn rules_can_name_accounts() {
        let p = policy(
            "[[rule]]\nname = \"ci-only\"\naccounts = [\"ci\"]\nexec = [\"/bin/sh\"]\ndecision = \"ask\"\n[[rule]]\nname = \"rest\"\nexec = [\"/bin/sh\"]\ndecision = \"deny\"\n",
        );
        let key = file_key(Path::new("/bin/sh")).unwrap();
        assert_eq!(name(&p, &exec(key, "x"), "ci"), Some("ci-only"));
        assert_eq!(name(&p, &exec(key, "x"), "claude"), Some("rest"));
    }

    #[test]
    fn connect_matching_v4_v6_and_mapped() {
        let p = policy(
            r#"
[[rule]]
name = "db"
connect = ["10.0.0.0/8", "2001:db8::/32"]
ports = [5432]
protocol = "tcp"
decision = "ask"
"#,
        );
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let ci = ["ci"];
        assert!(p.match_connect(v4, 5432, 1, &ci).is_some());
        assert!(p.match_connect(v4, 5433, 1, &ci).is_none());
        assert!(p.match_connect(v4, 5432, 2, &ci).is_none(), "udp excluded");
        assert!(
            p.match_connect(v4, 5432, 5, &ci).is_some(),
            "SCTP counts as TCP"
        );
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(p.match_connect(mapped, 5432, 1, &ci).is_some());
        let v6: IpAddr = "2001:db8::5".parse().unwrap();
        assert!(p.match_connect(v6, 5432, 1, &ci).is_some());
        assert!(p
            .match_connect("11.0.0.1".parse().unwrap(), 5432, 1, &ci)
            .is_none());
    }

    #[test]
    fn kernel_nets_include_enclosing_prefix_masks() {
        let p = policy(
            r#"
[[rule]]
name = "wide"
connect = ["10.0.0.0/8"]
decision = "ask"
[[rule]]
name = "narrow"
connect = ["10.1.0.0/16"]
ports = [22]
decision = "ask"
"#,
        );
        let t = p.kernel_tables();
        let narrow = t.nets.iter().find(|(len, _, _)| *len == 96 + 16).unwrap();
        assert_eq!(narrow.2, 0b11, "the /16 entry must carry the /8 rule too");
        assert_eq!(t.any_port_mask, 0b01);
        assert_eq!(t.ports.get(&22), Some(&0b10));
    }

    #[test]
    fn bad_cidr_names_rule() {
        let c = Config::parse(
            "[[rule]]\nname = \"db\"\nconnect = [\"10.0.0.0/33\"]\ndecision = \"ask\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let err = Policy::compile(&c.rules, Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("rule \"db\""), "{err}");
        assert!(err.to_string().contains("10.0.0.0/33"), "{err}");
    }
}
