//! Rule matching: which rule governs a held exec or connect, and the kernel prefilter tables
//! (binaries by device and inode, destination prefixes and ports) derived from the rules.
//!
//! Semantics: rules are tried in file order and the first whose account, action, arguments and
//! destination match decides. An action the kernel held that no rule matches in full (say
//! `kubectl get` under a `kubectl delete *` rule) is allowed at once.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    os::unix::fs::MetadataExt,
    path::Path,
};

use agent_common::{FileKey, HoldEvent};
use globset::{Glob, GlobSet, GlobSetBuilder};
use ipnet::IpNet;
use serde::Deserialize;

use crate::config::{ConfigError, ConnectDeny, ProtocolFilter, RuleConfig};

/// What a rule decides.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
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
        /// Argument globs; `None`: any arguments.
        args: Option<GlobSet>,
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

/// All rules of the agent, compiled.
#[derive(Debug, Default)]
pub struct Policy {
    /// In file order.
    pub rules: Vec<Rule>,
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

/// Kernel device number (`MAJOR << 20 | MINOR`) of a user-space `st_dev`.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = libc::major(st_dev);
    let minor = libc::minor(st_dev);
    (major << 20) | minor
}

/// Device and inode of the file `path` resolves to (symlinks followed).
pub fn file_key(path: &Path) -> std::io::Result<FileKey> {
    let meta = std::fs::metadata(path)?;
    Ok(FileKey {
        ino: meta.ino(),
        dev: kernel_dev(meta.dev()),
        pad: 0,
    })
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
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut out = Vec::with_capacity(rules.len());
        for rule in rules {
            let matcher = if !rule.exec.is_empty() {
                let all = rule.exec.iter().any(|e| e == "*");
                let mut files = Vec::new();
                for bin in rule.exec.iter().filter(|e| *e != "*") {
                    if !bin.starts_with('/') {
                        return Err(invalid(format!(
                            "rule {:?}: exec {bin:?} must be an absolute path",
                            rule.name
                        )));
                    }
                    match file_key(Path::new(bin)) {
                        Ok(key) => files.push(key),
                        // A binary not installed on this host cannot be run here either.
                        Err(e) => {
                            tracing::warn!(rule = %rule.name, binary = %bin, error = %e, "binary not found; rule skips it")
                        }
                    }
                }
                let args = if rule.args.is_empty() {
                    None
                } else {
                    let mut b = GlobSetBuilder::new();
                    for pattern in &rule.args {
                        let glob = Glob::new(pattern).map_err(|e| {
                            invalid(format!(
                                "rule {:?}: args pattern {pattern:?}: {e}",
                                rule.name
                            ))
                        })?;
                        b.add(glob);
                    }
                    Some(
                        b.build()
                            .map_err(|e| invalid(format!("rule {:?}: {e}", rule.name)))?,
                    )
                };
                Matcher::Exec { files, all, args }
            } else {
                let mut nets = Vec::new();
                for cidr in &rule.connect {
                    let net = cidr
                        .parse::<IpNet>()
                        .or_else(|_| cidr.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| {
                            invalid(format!(
                                "rule {:?}: connect {cidr:?} is not an address or CIDR (like 10.0.0.0/8 or 2001:db8::/32)",
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
        Ok(Self { rules: out })
    }

    /// The rule governing an exec of the file `key` with arguments `argv` (argv[0] included).
    ///
    /// An argv the agent had to cut (see `procinfo`) matches every argument pattern: what was
    /// cut cannot be checked, so the rule applies (fail closed).
    pub fn match_exec(&self, key: FileKey, argv: &[String], user: &str) -> Option<&Rule> {
        let joined = argv.get(1..).unwrap_or_default().join(" ");
        let cut = argv
            .last()
            .is_some_and(|a| a.starts_with("[airlock: ") && a.ends_with(" cut]"));
        self.rules
            .iter()
            .filter(|r| r.applies_to(user))
            .find(|rule| match &rule.matcher {
                Matcher::Exec { files, all, args } => {
                    (*all || files.contains(&key))
                        && (cut || args.as_ref().is_none_or(|g| g.is_match(&joined)))
                }
                Matcher::Connect { .. } => false,
            })
    }

    /// The rule governing a connect to `addr`:`port` over a socket of type `sock_type`
    /// (1 stream, 2 datagram).
    pub fn match_connect(
        &self,
        addr: IpAddr,
        port: u16,
        sock_type: u32,
        user: &str,
    ) -> Option<&Rule> {
        let v6 = to_v6(addr);
        self.rules
            .iter()
            .filter(|r| r.applies_to(user))
            .find(|rule| match &rule.matcher {
                Matcher::Connect {
                    nets,
                    ports,
                    protocol,
                } => {
                    let proto_ok = match protocol {
                        ProtocolFilter::Any => true,
                        ProtocolFilter::Tcp => sock_type == 1,
                        ProtocolFilter::Udp => sock_type == 2,
                    };
                    proto_ok
                        && (ports.is_empty() || ports.contains(&port))
                        && nets.iter().any(|n| contains(net_v6(n), (128, v6.octets())))
                }
                Matcher::Exec { .. } => false,
            })
    }

    /// The rule for a held event of account `user`, given the argv read from /proc (exec only).
    pub fn match_event(&self, ev: &HoldEvent, argv: &[String], user: &str) -> Option<&Rule> {
        if ev.kind == agent_common::HoldKind::Connect as u32 {
            self.match_connect(display_addr(ev.addr), ev.port, ev.sock_type, user)
        } else {
            let key = FileKey {
                ino: ev.ino,
                dev: ev.dev,
                pad: 0,
            };
            self.match_exec(key, argv, user)
        }
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
        let mut nets: Vec<_> = prefixes
            .iter()
            .map(|(&(len, addr), _)| {
                let mask = prefixes
                    .iter()
                    .filter(|(outer, _)| contains(**outer, (len, addr)))
                    .fold(0, |m, (_, bits)| m | bits);
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

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn first_matching_rule_wins_and_args_glob() {
        let p = policy(
            r#"
[[rule]]
name = "delete"
exec = ["/bin/sh"]
args = ["delete *"]
decision = "ask"
[[rule]]
name = "rest"
exec = ["/bin/sh"]
decision = "allow"
"#,
        );
        let key = file_key(Path::new("/bin/sh")).unwrap();
        assert_eq!(
            p.match_exec(key, &argv("kubectl delete pod x"), "ci")
                .unwrap()
                .config
                .name,
            "delete"
        );
        assert_eq!(
            p.match_exec(key, &argv("kubectl get pods"), "ci")
                .unwrap()
                .config
                .name,
            "rest"
        );
        let other = file_key(Path::new("/")).unwrap();
        assert!(p.match_exec(other, &argv("x delete y"), "ci").is_none());
    }

    #[test]
    fn a_cut_argv_matches_argument_patterns() {
        let p = policy(
            "[[rule]]\nname = \"force\"\nexec = [\"/bin/sh\"]\nargs = [\"* --force\"]\ndecision = \"ask\"\n",
        );
        let key = file_key(Path::new("/bin/sh")).unwrap();
        assert!(p.match_exec(key, &argv("sh delete pod"), "ci").is_none());
        let cut = vec![
            "sh".to_owned(),
            "pad".to_owned(),
            "[airlock: 9000 more items cut]".to_owned(),
        ];
        assert!(
            p.match_exec(key, &cut, "ci").is_some(),
            "what was cut could hide --force"
        );
    }

    #[test]
    fn rules_can_name_accounts() {
        let p = policy(
            "[[rule]]\nname = \"ci-only\"\naccounts = [\"ci\"]\nexec = [\"/bin/sh\"]\ndecision = \"ask\"\n[[rule]]\nname = \"rest\"\nexec = [\"/bin/sh\"]\ndecision = \"deny\"\n",
        );
        let key = file_key(Path::new("/bin/sh")).unwrap();
        assert_eq!(
            p.match_exec(key, &argv("sh x"), "ci").unwrap().config.name,
            "ci-only"
        );
        assert_eq!(
            p.match_exec(key, &argv("sh x"), "claude")
                .unwrap()
                .config
                .name,
            "rest"
        );
    }

    #[test]
    fn symlinked_path_resolves_to_same_inode() {
        // /bin is a symlink to /usr/bin on Debian 12; either path must give the same key.
        let a = file_key(Path::new("/bin/sh")).unwrap();
        let b = file_key(Path::new("/usr/bin/sh")).unwrap();
        assert_eq!(a, b);
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
        assert!(p.match_connect(v4, 5432, 1, "ci").is_some());
        assert!(p.match_connect(v4, 5433, 1, "ci").is_none());
        assert!(p.match_connect(v4, 5432, 2, "ci").is_none(), "udp excluded");
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(p.match_connect(mapped, 5432, 1, "ci").is_some());
        let v6: IpAddr = "2001:db8::5".parse().unwrap();
        assert!(p.match_connect(v6, 5432, 1, "ci").is_some());
        assert!(p
            .match_connect("11.0.0.1".parse().unwrap(), 5432, 1, "ci")
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
