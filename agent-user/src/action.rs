//! What a held action is: the program (and its arguments) or the destination, as rules match it
//! and as approvers read it.
//!
//! An exec has several identities: the program the kernel runs, the script the exec named (run
//! by its interpreter), the program a loader maps (`ld.so /usr/bin/kubectl ...`), and, for a
//! file the account could have made, the rule binary it is a byte-for-byte copy of. argv[0] is
//! the caller's choice and never names the program; the program's own arguments are those after
//! its place in the command line.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use agent_common::{flags, FileKey, FileStamp, HoldEvent, HoldKind};
use airlock_proto::v1::{
    action_request::Action, ConnectAction, ExecAction, ProcessContext, Protocol,
};

use crate::{
    identity::{self, Hasher},
    policy::{display_addr, ExecSubject, Policy},
    procinfo,
};

/// What rules match.
#[derive(Debug, Clone)]
pub enum Subject {
    /// An exec or executable mapping.
    Exec(ExecSubject),
    /// A connect or an addressed send.
    Connect {
        /// Destination address.
        addr: IpAddr,
        /// Destination port.
        port: u16,
        /// 1 stream, 2 datagram.
        sock_type: u32,
    },
}

/// A held action, described.
#[derive(Debug, Clone)]
pub struct Described {
    /// For matching.
    pub subject: Subject,
    /// For the request.
    pub action: Action,
    /// Files the account made that turned out to be no copy of a held binary, with their change
    /// time: once allowed, the kernel need not hold them again until they change.
    pub clears: Vec<(FileKey, FileStamp)>,
}

/// Describes the held action `ev` of the task whose context is `ctx`.
pub fn describe(
    ev: &HoldEvent,
    ctx: &ProcessContext,
    proc_root: &Path,
    policy: &Policy,
    hasher: &Hasher,
) -> Described {
    match HoldKind::from_raw(ev.kind) {
        Some(HoldKind::Connect | HoldKind::Send) => describe_net(ev),
        kind => describe_exec(
            ev,
            kind == Some(HoldKind::Map),
            ctx,
            proc_root,
            policy,
            hasher,
        ),
    }
}

fn describe_net(ev: &HoldEvent) -> Described {
    let addr = display_addr(ev.addr);
    let protocol = match (ev.protocol, ev.sock_type) {
        (6, _) | (0, 1) => Protocol::Tcp,
        (17, _) | (0, 2) => Protocol::Udp,
        _ => Protocol::Unspecified,
    };
    let via = if ev.flags & flags::INDIRECT != 0 {
        "io_uring"
    } else if ev.kind == HoldKind::Send as u32 {
        "sendmsg"
    } else {
        "connect"
    };
    Described {
        subject: Subject::Connect {
            addr,
            port: ev.port,
            sock_type: u32::from(ev.sock_type),
        },
        action: Action::Connect(ConnectAction {
            address: addr.to_string(),
            port: u32::from(ev.port),
            protocol: protocol as i32,
            family: if ev.family == 10 { 6 } else { 4 },
            via: via.into(),
        }),
        clears: Vec::new(),
    }
}

fn describe_exec(
    ev: &HoldEvent,
    mapping: bool,
    ctx: &ProcessContext,
    proc_root: &Path,
    policy: &Policy,
    hasher: &Hasher,
) -> Described {
    let argv = &ctx.argv;
    let dir = procinfo::thread_dir(proc_root, ev.tgid, ev.tid);
    let cwd = Path::new(&ctx.cwd);
    let mut subject = ExecSubject {
        keys: vec![ev.file],
        self_made: ev.flags & flags::SELF_MADE != 0,
        // No command line (the task is already gone): nothing rules out any pattern.
        cut: argv.is_empty() || procinfo::is_cut(argv),
        ..Default::default()
    };
    // Where the program's own arguments start, what it is called, and how to read its bytes.
    let (via, program, contents): (&str, String, Option<PathBuf>) = if mapping {
        let fd = open_fd_of(proc_root, ev.tgid, ev.file);
        let path = fd
            .as_ref()
            .and_then(|fd| std::fs::read_link(fd).ok())
            .map(|p| p.to_string_lossy().into_owned())
            .or_else(|| {
                policy
                    .binary_path(&ev.file)
                    .map(|p| p.display().to_string())
            })
            .unwrap_or_default();
        match argv
            .iter()
            .skip(1)
            .position(|a| resolves_to(a, cwd, ev.file))
        {
            Some(i) => subject.args = argv[i + 2..].to_vec(),
            None => {
                // The loader's command line does not name the file: its arguments cannot be
                // told apart, so every argument pattern applies.
                subject.args = argv.get(1..).unwrap_or_default().to_vec();
                subject.cut = true;
            }
        }
        ("loader", path, fd)
    } else if ev.flags & flags::SCRIPT != 0 {
        subject.keys.push(ev.named);
        // binfmt_script runs [interpreter, optional argument, script, script arguments...]: the
        // script's own arguments are the last argc - 1.
        let own = (ev.argc as usize).saturating_sub(1);
        let script_at = argv.len().checked_sub(own + 1).filter(|i| *i >= 1);
        let script = match script_at {
            Some(i) => {
                subject.args = argv[i + 1..].to_vec();
                argv[i].clone()
            }
            None => {
                subject.args = argv.get(1..).unwrap_or_default().to_vec();
                subject.cut = true;
                String::new()
            }
        };
        let path = policy
            .binary_path(&ev.named)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| absolute(&script, cwd));
        let contents = (!path.is_empty()).then(|| PathBuf::from(&path));
        ("script", path, contents)
    } else {
        subject.args = argv.get(1..).unwrap_or_default().to_vec();
        ("exec", String::new(), Some(dir.join("exe")))
    };
    let mut action = ExecAction {
        path: ctx.exe.clone(),
        argv: argv.clone(),
        inode: ev.file.ino,
        device: u64::from(ev.file.dev),
        program,
        via: via.into(),
        ..Default::default()
    };
    let mut clears = Vec::new();
    if subject.self_made {
        match contents.as_deref().map(|p| hasher.sum(p)) {
            Some(Ok(sum)) => {
                action.sha256 = identity::hex(&sum);
                match policy.copy_of(&sum, hasher) {
                    Some(binary) => {
                        subject.keys.push(binary.key);
                        action.copy_of = binary.path.display().to_string();
                    }
                    None => {
                        // Which of the files was the account's is not said; only the right
                        // key and change time together clear anything.
                        clears.push((ev.named, ev.stamp));
                        clears.push((ev.file, ev.stamp));
                    }
                }
            }
            // Unreadable: no copy can be ruled out, so nothing is cleared.
            Some(Err(e)) => tracing::warn!(pid = ev.tgid, error = %e, "cannot hash the program"),
            None => {}
        }
    }
    Described {
        subject: Subject::Exec(subject),
        action: Action::Exec(action),
        clears,
    }
}

/// `path` made absolute against `cwd`.
fn absolute(path: &str, cwd: &Path) -> String {
    if path.is_empty() || path.starts_with('/') {
        return path.to_owned();
    }
    cwd.join(path).display().to_string()
}

/// Whether the command-line argument `arg` names the file `key` (relative to `cwd`).
fn resolves_to(arg: &str, cwd: &Path, key: FileKey) -> bool {
    if arg.is_empty() || arg.starts_with('-') {
        return false;
    }
    identity::file_key(&cwd.join(arg)).is_ok_and(|k| k == key)
}

/// The /proc path of an open descriptor of process `tgid` on the file `key` (a loader maps the
/// program it opened).
fn open_fd_of(proc_root: &Path, tgid: u32, key: FileKey) -> Option<PathBuf> {
    let fds = proc_root.join(tgid.to_string()).join("fd");
    std::fs::read_dir(&fds).ok()?.flatten().find_map(|e| {
        let path = e.path();
        identity::file_key(&path)
            .ok()
            .filter(|k| *k == key)
            .map(|_| path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn context(argv: &[&str]) -> ProcessContext {
        ProcessContext {
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            cwd: "/".into(),
            ..Default::default()
        }
    }

    fn exec_of(d: &Described) -> (&ExecSubject, &ExecAction) {
        match (&d.subject, &d.action) {
            (Subject::Exec(s), Action::Exec(a)) => (s, a),
            _ => panic!("not an exec: {d:?}"),
        }
    }

    #[test]
    fn argv0_is_not_an_argument_even_when_empty() {
        let ev = HoldEvent {
            kind: HoldKind::Exec as u32,
            ..Default::default()
        };
        let d = describe(
            &ev,
            &context(&["", "delete", "ns"]),
            Path::new("/proc"),
            &Policy::default(),
            &Hasher::default(),
        );
        let (s, a) = exec_of(&d);
        assert_eq!(s.args, ["delete", "ns"]);
        assert_eq!(a.via, "exec");
    }

    #[test]
    fn script_arguments_are_the_last_argc_minus_one() {
        let ev = HoldEvent {
            kind: HoldKind::Exec as u32,
            flags: flags::SCRIPT,
            argc: 3,
            ..Default::default()
        };
        // `deploy.sh prod now` run as `/bin/sh -e /opt/deploy.sh prod now`.
        let d = describe(
            &ev,
            &context(&["/bin/sh", "-e", "/opt/deploy.sh", "prod", "now"]),
            Path::new("/proc"),
            &Policy::default(),
            &Hasher::default(),
        );
        let (s, a) = exec_of(&d);
        assert_eq!(s.args, ["prod", "now"]);
        assert_eq!(a.program, "/opt/deploy.sh");
        assert_eq!(a.via, "script");
        assert!(!s.cut);
    }

    #[test]
    fn a_loader_runs_the_program_it_was_given() {
        let key = identity::file_key(Path::new("/usr/bin/env")).unwrap();
        let ev = HoldEvent {
            kind: HoldKind::Map as u32,
            file: key,
            ..Default::default()
        };
        let c = Config::parse(
            "[[rule]]\nname = \"env\"\nexec = [\"/usr/bin/env\"]\ndecision = \"ask\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let policy = Policy::compile(&c.rules, Path::new("t.toml")).unwrap();
        let d = describe(
            &ev,
            &context(&["ld.so", "--argv0", "x", "/usr/bin/env", "delete", "ns"]),
            Path::new("/proc"),
            &policy,
            &Hasher::default(),
        );
        let (s, a) = exec_of(&d);
        assert_eq!(s.args, ["delete", "ns"]);
        assert_eq!(a.program, "/usr/bin/env");
        assert_eq!(a.via, "loader");
        assert!(!s.cut);
    }
}
