//! Context of a held task, read from /proc: command line, executable, working directory,
//! environment names, cgroup and unit, user names and the parent chain.
//!
//! The kernel stops the task before it runs; reading /proc before the stop is complete may see
//! an empty command line, so [`wait_stopped`] comes first. Everything is read through the held
//! thread's own directory (`/proc/PID/task/TID`), which stays readable when the process's
//! leader has exited before its other threads.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use airlock_proto::v1::{Ancestor, EnvVar, ProcessContext};
use nix::unistd::{Gid, Group, Uid, User};

/// How many ancestors a request carries.
const MAX_ANCESTORS: usize = 8;
/// Bytes of a command line or environment kept (a request must stay far below gRPC's limits,
/// whatever a task puts in its argv).
const MAX_TEXT: usize = 64 * 1024;
/// Arguments or environment entries kept.
const MAX_ITEMS: usize = 1024;

/// State of a task as /proc/PID/stat shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Stopped by a signal (`T`) or traced (`t`).
    Stopped,
    /// Any other state.
    Other(char),
    /// No such process (it exited).
    Gone,
}

fn proc_dir(root: &Path, pid: u32) -> PathBuf {
    root.join(pid.to_string())
}

/// The directory of thread `tid` of process `tgid`.
pub fn thread_dir(root: &Path, tgid: u32, tid: u32) -> PathBuf {
    proc_dir(root, tgid).join("task").join(tid.to_string())
}

/// The state letter of process `pid`.
pub fn task_state(root: &Path, pid: u32) -> TaskState {
    state_of(&proc_dir(root, pid))
}

/// The state letter of the task whose /proc directory is `dir`.
pub fn state_of(dir: &Path) -> TaskState {
    let Ok(stat) = fs::read_to_string(dir.join("stat")) else {
        return TaskState::Gone;
    };
    // The comm field is in parentheses and may itself contain ") ": split at the last one.
    match stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
    {
        Some('T') | Some('t') => TaskState::Stopped,
        Some('Z') | Some('X') => TaskState::Gone,
        Some(c) => TaskState::Other(c),
        None => TaskState::Gone,
    }
}

/// Waits (polling) until the task in `dir` is stopped or gone, at most `limit`.
pub async fn wait_stopped(dir: &Path, limit: Duration) -> TaskState {
    let start = Instant::now();
    let mut delay = Duration::from_micros(200);
    loop {
        let state = state_of(dir);
        if matches!(state, TaskState::Stopped | TaskState::Gone) || start.elapsed() >= limit {
            return state;
        }
        tokio::time::sleep(delay).await;
        // Short steps: every millisecond slept here is added to the held task's round trip.
        delay = (delay * 2).min(Duration::from_millis(2));
    }
}

/// argv of the task in `dir` (NUL-separated cmdline), and whether it had to be cut.
pub fn cmdline(dir: &Path) -> (Vec<String>, bool) {
    fs::read(dir.join("cmdline"))
        .map(|raw| split_nul(&raw))
        .unwrap_or_default()
}

/// Splits NUL-terminated items, keeping empty ones (an empty argument is an argument), at most
/// [`MAX_ITEMS`] items and [`MAX_TEXT`] bytes; a cut is marked with a last item saying how much
/// was left out (for people to read; the flag returned with it is what says it was cut, since
/// a task can put any text in its argv).
fn split_nul(raw: &[u8]) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    let mut bytes = 0;
    // Each item ends with a NUL; what follows the last one is not an item.
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    if raw.is_empty() {
        return (out, false);
    }
    let items: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    for (i, item) in items.iter().enumerate() {
        if out.len() == MAX_ITEMS || bytes + item.len() > MAX_TEXT {
            out.push(format!("[airlock: {} more items cut]", items.len() - i));
            return (out, true);
        }
        bytes += item.len();
        out.push(String::from_utf8_lossy(item).into_owned());
    }
    (out, false)
}

fn link(dir: &Path, name: &str) -> String {
    fs::read_link(dir.join(name))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Fields of /proc/PID/status we use.
#[derive(Debug, Default, Clone, Copy)]
struct Status {
    ppid: u32,
    uid: u32,
    gid: u32,
}

fn status(dir: &Path) -> Option<Status> {
    let text = fs::read_to_string(dir.join("status")).ok()?;
    let mut st = Status::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("PPid:") => st.ppid = it.next()?.parse().ok()?,
            Some("Uid:") => st.uid = it.next()?.parse().ok()?,
            Some("Gid:") => st.gid = it.next()?.parse().ok()?,
            _ => {}
        }
    }
    Some(st)
}

/// Name of a uid, or the number.
pub fn user_name(uid: u32) -> String {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

fn group_name(gid: u32) -> String {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name)
}

/// The cgroup v2 path of `pid` and the systemd unit it names, if any.
fn cgroup(dir: &Path) -> (String, String) {
    let text = fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_owned();
    let unit = path
        .rsplit('/')
        .find(|c| {
            [".service", ".scope"]
                .iter()
                .any(|suffix| c.ends_with(suffix))
        })
        .unwrap_or_default()
        .to_owned();
    (path, unit)
}

/// Environment names of `pid`; values only for names in `allow`.
fn environment(dir: &Path, allow: &[String]) -> Vec<EnvVar> {
    let raw = fs::read(dir.join("environ")).unwrap_or_default();
    split_nul(&raw)
        .0
        .into_iter()
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let (name, value) = kv.split_once('=')?;
            let value = allow.iter().any(|a| a == name).then(|| value.to_owned());
            Some(EnvVar {
                name: name.to_owned(),
                value,
            })
        })
        .collect()
}

fn login_uid(dir: &Path) -> Option<u32> {
    let text = fs::read_to_string(dir.join("loginuid")).ok()?;
    // 4294967295 means "not set" (no login session).
    text.trim().parse().ok().filter(|uid| *uid != u32::MAX)
}

/// Everything the decider is told about thread `tid` of process `pid`, whose watch began with
/// account `origin_uid`.
pub fn gather(
    root: &Path,
    pid: u32,
    tid: u32,
    origin_uid: u32,
    env_allow: &[String],
) -> ProcessContext {
    let dir = thread_dir(root, pid, tid);
    let (argv, argv_truncated) = cmdline(&dir);
    let st = status(&dir).unwrap_or_default();
    let (cgroup, unit) = cgroup(&dir);
    let mut ancestors = Vec::new();
    let mut next = st.ppid;
    while next > 0 && ancestors.len() < MAX_ANCESTORS {
        let adir = proc_dir(root, next);
        let Some(ast) = status(&adir) else { break };
        ancestors.push(Ancestor {
            pid: next,
            uid: ast.uid,
            user: user_name(ast.uid),
            exe: link(&adir, "exe"),
            argv: cmdline(&adir).0,
        });
        next = ast.ppid;
    }
    let login = login_uid(&dir);
    let comm = fs::read_to_string(dir.join("comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_default();
    ProcessContext {
        pid,
        uid: st.uid,
        gid: st.gid,
        user: user_name(st.uid),
        group: group_name(st.gid),
        exe: link(&dir, "exe"),
        argv,
        argv_truncated,
        cwd: link(&dir, "cwd"),
        env: environment(&dir, env_allow),
        cgroup,
        unit,
        ancestors,
        comm,
        login_uid: login,
        login_user: login.map(user_name).unwrap_or_default(),
        watched_as: user_name(origin_uid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_own_process() {
        let me = std::process::id();
        let ctx = gather(Path::new("/proc"), me, me, 0, &["PATH".to_owned()]);
        assert_eq!(ctx.pid, me);
        assert!(!ctx.argv.is_empty());
        assert_eq!(ctx.cwd, std::env::current_dir().unwrap().to_string_lossy());
        assert!(!ctx.ancestors.is_empty(), "cargo test has a parent");
        let path = ctx.env.iter().find(|e| e.name == "PATH").unwrap();
        assert!(path.value.is_some(), "allow-listed value is sent");
        assert!(ctx
            .env
            .iter()
            .filter(|e| e.name != "PATH")
            .all(|e| e.value.is_none()));
    }

    #[test]
    fn huge_command_lines_are_cut_and_say_so() {
        let mut raw = Vec::new();
        for _ in 0..5000 {
            raw.extend_from_slice(b"argument\0");
        }
        let (v, cut) = split_nul(&raw);
        assert!(cut);
        assert_eq!(v.len(), MAX_ITEMS + 1);
        assert_eq!(
            v.last().unwrap(),
            &format!("[airlock: {} more items cut]", 5000 - MAX_ITEMS)
        );
        let big = vec![b'x'; MAX_TEXT + 10];
        assert_eq!(
            split_nul(&big),
            (vec!["[airlock: 1 more items cut]".to_owned()], true)
        );
        let forged = b"kubectl\0delete\0[airlock: 1 more items cut]\0";
        assert!(!split_nul(forged).1, "text in argv does not make it cut");
    }

    #[test]
    fn empty_arguments_are_kept_in_place() {
        assert_eq!(split_nul(b"\0delete\0\0ns\0").0, ["", "delete", "", "ns"]);
        assert_eq!(split_nul(b"a\0").0, ["a"]);
        assert!(split_nul(b"").0.is_empty());
    }

    #[test]
    fn state_of_running_and_missing() {
        assert!(matches!(
            task_state(Path::new("/proc"), std::process::id()),
            TaskState::Other(_)
        ));
        assert_eq!(
            task_state(Path::new("/proc"), u32::MAX - 1),
            TaskState::Gone
        );
    }
}
