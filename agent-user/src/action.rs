//! What a held action is: the program (and its arguments) or the destination, as rules match it
//! and as approvers read it.
//!
//! An exec has several identities, each with the arguments it was given: the program the kernel
//! runs (an interpreter gets every argument after argv[0], its `#!` line's included), the script
//! the exec named (its own arguments), the interpreters between them, the program a loader maps
//! (`ld.so /usr/bin/kubectl ...`: the arguments after it), and, for a file the account could have
//! made, the rule binary it is a byte-for-byte copy of. argv[0] is the caller's choice and never
//! names the program.
//!
//! Everything here reads what the task can change (its files, its command line) and may block
//! (a FIFO, a stalled FUSE server): callers run it off the async workers, with a time limit.

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
    policy::{display_addr, ExecSubject, Identity, Policy},
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
        Some(HoldKind::Connect | HoldKind::Send) => describe_net(ev, policy),
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

fn describe_net(ev: &HoldEvent, policy: &Policy) -> Described {
    let addr = display_addr(ev.addr);
    let protocol = match (ev.protocol, ev.sock_type) {
        (6, _) | (0, 1) => Protocol::Tcp,
        (17, _) | (0, 2) => Protocol::Udp,
        _ => Protocol::Unspecified,
    };
    let via = if ev.flags & flags::SCTP_CONNECTX != 0 {
        "sctp-connectx"
    } else if ev.flags & flags::INDIRECT != 0 {
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
            name: policy.name_of(addr).unwrap_or_default().to_owned(),
        }),
        clears: Vec::new(),
    }
}

/// `path` (absolute, or relative to `cwd`) as the task sees it: under its own root.
fn in_task(proc_root: &Path, tgid: u32, cwd: &Path, path: &str) -> PathBuf {
    let full = if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        cwd.join(path)
    };
    let relative = full.strip_prefix("/").unwrap_or(&full);
    proc_root.join(tgid.to_string()).join("root").join(relative)
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
    let after = |i: usize| argv.get(i + 1..).unwrap_or_default().to_vec();
    let dir = procinfo::thread_dir(proc_root, ev.tgid, ev.tid);
    let cwd = Path::new(&ctx.cwd);
    let mut subject = ExecSubject {
        self_made: ev.flags & flags::SELF_MADE != 0,
        // No command line (the task is already gone), or too long to read whole: its arguments
        // are not known.
        cut: argv.is_empty() || ctx.argv_truncated,
        ..Default::default()
    };
    let known = |key: FileKey, args: Vec<String>| Identity {
        key,
        args,
        args_known: true,
    };
    // The program's identities, its name for approvers, and where its bytes can be read.
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
        // A loader's options come before the program (`--argv0 NAME`, `--library-path DIR`,
        // ...): every argument that names the mapped file is a candidate for the program, and
        // a rule applies if it matches the arguments after any of them.
        for (i, arg) in argv.iter().enumerate().skip(1) {
            let resolved = in_task(proc_root, ev.tgid, cwd, arg);
            if !arg.is_empty() && identity::regular_file_key(&resolved).is_ok_and(|k| k == ev.file)
            {
                subject.identities.push(known(ev.file, after(i)));
            }
        }
        if subject.identities.is_empty() {
            subject.identities.push(Identity {
                key: ev.file,
                args: after(0),
                args_known: false,
            });
        }
        ("loader", path, fd)
    } else if ev.flags & flags::SCRIPT != 0 {
        // The interpreter gets every argument after argv[0], its `#!` line's among them.
        subject.identities.push(known(ev.file, after(0)));
        // binfmt_script runs [interpreter, optional argument, script, script arguments...]: the
        // script's own arguments are the last argc - 1.
        let own = (ev.argc as usize).saturating_sub(1);
        let script_at = argv.len().checked_sub(own + 1).filter(|i| *i >= 1);
        let script = match script_at {
            Some(i) => {
                subject.identities.push(known(ev.named, after(i)));
                argv[i].clone()
            }
            None => {
                subject.identities.push(Identity {
                    key: ev.named,
                    args: after(0),
                    args_known: false,
                });
                String::new()
            }
        };
        // Interpreters between the script and the one that runs: their arguments are not told
        // apart here.
        for key in ev.middle.iter().filter(|k| **k != FileKey::default()) {
            subject.identities.push(Identity {
                key: *key,
                args: after(0),
                args_known: false,
            });
        }
        let shown = policy
            .binary_path(&ev.named)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| script.clone());
        let contents = (!script.is_empty()).then(|| in_task(proc_root, ev.tgid, cwd, &script));
        ("script", shown, contents)
    } else {
        subject.identities.push(known(ev.file, after(0)));
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
        let hashed = contents
            .as_deref()
            .ok_or_else(|| "no path to read".to_owned())
            .and_then(|p| {
                let size = std::fs::metadata(p).map_err(|e| e.to_string())?.len();
                Ok((hasher.sum(p).map_err(|e| e.to_string())?, size))
            });
        match hashed {
            Ok((sum, size)) => {
                action.sha256 = identity::hex(&sum);
                match policy.copy_of(&sum, size, hasher) {
                    Some(binary) => {
                        // The copy is the binary, with the arguments it was given.
                        let copies: Vec<Identity> = subject
                            .identities
                            .iter()
                            .map(|i| Identity {
                                key: binary.key,
                                ..i.clone()
                            })
                            .collect();
                        subject.identities.extend(copies);
                        action.copy_of = binary.path.display().to_string();
                    }
                    None => {
                        // Which of the files was the account's is not said; only the right key
                        // and change time together clear anything.
                        clears.push((ev.named, ev.stamp));
                        clears.push((ev.file, ev.stamp));
                    }
                }
            }
            Err(e) => {
                // No copy can be ruled out: it counts as a copy of every held binary.
                tracing::warn!(pid = ev.tgid, error = %e, "cannot hash the program; treating it as a copy of every held binary");
                subject.unchecked = true;
            }
        }
    }
    Described {
        subject: Subject::Exec(subject),
        action: Action::Exec(action),
        clears,
    }
}

/// The /proc path of an open descriptor of process `tgid` on the file `key` (a loader maps the
/// program it opened).
fn open_fd_of(proc_root: &Path, tgid: u32, key: FileKey) -> Option<PathBuf> {
    let fds = proc_root.join(tgid.to_string()).join("fd");
    std::fs::read_dir(&fds).ok()?.flatten().find_map(|e| {
        let path = e.path();
        identity::regular_file_key(&path)
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

    fn args(s: &ExecSubject, key: FileKey) -> Vec<Vec<String>> {
        s.identities
            .iter()
            .filter(|i| i.key == key && i.args_known)
            .map(|i| i.args.clone())
            .collect()
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
        assert_eq!(args(s, ev.file), [["delete", "ns"]]);
        assert_eq!(a.via, "exec");
    }

    #[test]
    fn a_script_and_its_interpreter_each_get_their_own_arguments() {
        let interpreter = FileKey {
            ino: 1,
            dev: 1,
            pad: 0,
        };
        let script = FileKey {
            ino: 2,
            dev: 1,
            pad: 0,
        };
        let ev = HoldEvent {
            kind: HoldKind::Exec as u32,
            flags: flags::SCRIPT,
            argc: 3,
            file: interpreter,
            named: script,
            ..Default::default()
        };
        // `deploy.sh prod now` run as `/bin/sh -e /opt/deploy.sh prod now` (a `#!/bin/sh -e`
        // line): the interpreter's arguments include the line's own.
        let d = describe(
            &ev,
            &context(&["/bin/sh", "-e", "/opt/deploy.sh", "prod", "now"]),
            Path::new("/proc"),
            &Policy::default(),
            &Hasher::default(),
        );
        let (s, a) = exec_of(&d);
        assert_eq!(args(s, script), [["prod", "now"]]);
        assert_eq!(
            args(s, interpreter),
            [["-e", "/opt/deploy.sh", "prod", "now"]]
        );
        assert_eq!(a.program, "/opt/deploy.sh");
        assert_eq!(a.via, "script");
        assert!(!s.cut);
    }

    #[test]
    fn a_loader_runs_the_program_it_was_given_after_its_options() {
        let key = identity::file_key(Path::new("/usr/bin/env")).unwrap();
        let ev = HoldEvent {
            kind: HoldKind::Map as u32,
            file: key,
            // Paths are resolved under /proc/PID/root: this process's own will do.
            tgid: std::process::id(),
            ..Default::default()
        };
        let c = Config::parse(
            "[[rule]]\nname = \"env\"\nexec = [\"/usr/bin/env\"]\ndecision = \"ask\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let policy = Policy::compile(&c.rules, Path::new("t.toml")).unwrap();
        // `--argv0 /usr/bin/env` names the file too: both places are candidates.
        let d = describe(
            &ev,
            &context(&[
                "ld.so",
                "--argv0",
                "/usr/bin/env",
                "/usr/bin/env",
                "delete",
                "ns",
            ]),
            Path::new("/proc"),
            &policy,
            &Hasher::default(),
        );
        let (s, a) = exec_of(&d);
        assert!(args(s, key).contains(&vec!["delete".to_owned(), "ns".to_owned()]));
        assert_eq!(a.program, "/usr/bin/env");
        assert_eq!(a.via, "loader");
    }
}
