//! Telling a held task what is happening: one line on its standard error when it is held, and
//! one when it is decided, so that an AI agent (or a person) can tell a hold from a hang and
//! learn why it was denied.
//!
//! The line goes through the task's own open file: `pidfd_getfd` on its fd 2, never a path
//! opened as root (root appending to a path a task names would let the task write into files
//! it may only read). The file must be open for writing and be a terminal, a pipe or a regular
//! file: not /dev/kmsg, a socket or any other device. Writing never blocks: a pipe is written
//! only when it has room for the whole line, with `RWF_NOWAIT` where the kernel takes it, and
//! lines are short.

use std::{
    fmt::Write as _,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// Longest line written, in bytes (agent-controlled text is cut to fit).
const MAX_LINE: usize = 512;
/// Longest quoted command in a line, in characters.
const MAX_WHAT: usize = 160;

/// Why a notice was not written.
#[derive(Debug, thiserror::Error)]
pub enum NoticeError {
    /// The task or its fd 2 is gone, or the agent may not take it.
    #[error("cannot take the task's fd 2: {0}")]
    Take(std::io::Error),
    /// fd 2 is open read-only.
    #[error("the task's fd 2 is not open for writing")]
    NotWritable,
    /// fd 2 is something other than a terminal, a pipe or a regular file.
    #[error("the task's fd 2 is not a terminal, a pipe or a regular file")]
    NotAllowed,
    /// A pipe without room for the line (nobody reads it).
    #[error("the task's stderr pipe is full")]
    Full,
    /// The write failed.
    #[error("writing to the task's fd 2: {0}")]
    Write(std::io::Error),
    /// The notice thread is stuck on an earlier write or its queue is full.
    #[error("the notice thread is busy (an earlier write blocks); notice dropped")]
    Busy,
}

/// Notices waiting for the writer thread, at most; past it a notice is dropped.
const QUEUE: usize = 64;

/// One notice for the writer thread.
struct Job {
    pid: u32,
    uid: u32,
    line: String,
    done: tokio::sync::oneshot::Sender<Result<(), NoticeError>>,
}

/// The thread that writes notices, apart from every other thread of the agent: a write the
/// kernel lets block anyway (a terminal whose output was stopped, a FUSE file) stalls only
/// notices, never holds, reloads or the heartbeat. Its queue is bounded; when it is full,
/// notices are dropped.
pub struct Notifier {
    tx: std::sync::mpsc::SyncSender<Job>,
}

impl Default for Notifier {
    fn default() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("airlock-notices".into())
            .spawn(move || {
                for job in rx {
                    // Written with the task's file-system identity: root's file capabilities
                    // (CAP_FSETID keeping setuid bits on a written file) do not apply.
                    // SAFETY: setfsuid acts on this thread only.
                    unsafe { libc::syscall(libc::SYS_setfsuid, job.uid) };
                    let r = tell(job.pid, &job.line);
                    // SAFETY: as above, back to root's.
                    unsafe { libc::syscall(libc::SYS_setfsuid, 0) };
                    let _ = job.done.send(r);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the notice thread; held tasks are not told");
        }
        Self { tx }
    }
}

impl Notifier {
    /// Tells process `pid` (running as `uid`) `line`, waiting at most `limit` for the write.
    pub async fn tell(
        &self,
        pid: u32,
        uid: u32,
        line: String,
        limit: std::time::Duration,
    ) -> Result<(), NoticeError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.tx
            .try_send(Job {
                pid,
                uid,
                line,
                done,
            })
            .map_err(|_| NoticeError::Busy)?;
        match tokio::time::timeout(limit, answer).await {
            Ok(Ok(r)) => r,
            _ => Err(NoticeError::Busy),
        }
    }
}

/// Writes `line` (one line, without its newline) to the standard error of process `pid`.
pub fn tell(pid: u32, line: &str) -> Result<(), NoticeError> {
    let fd = take_stderr(pid)?;
    let kind = writable_kind(&fd)?;
    let mut bytes = cut(line, MAX_LINE - 1).as_bytes().to_vec();
    bytes.push(b'\n');
    if kind == Kind::Pipe && !pipe_has_room(&fd, bytes.len()) {
        return Err(NoticeError::Full);
    }
    write_nowait(&fd, &bytes)
}

/// What fd 2 is.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Tty,
    Pipe,
    File,
}

/// A duplicate of process `pid`'s fd 2 (the same open file).
fn take_stderr(pid: u32) -> Result<OwnedFd, NoticeError> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(NoticeError::Take(std::io::Error::last_os_error()));
    }
    // SAFETY: the fd was just returned to us and is owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes a pidfd, a target fd number and flags; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), 2, 0) };
    if fd < 0 {
        return Err(NoticeError::Take(std::io::Error::last_os_error()));
    }
    // SAFETY: as above, a new fd that only we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Checks that `fd` was opened for writing and is a tty, a pipe or a regular file.
fn writable_kind(fd: &OwnedFd) -> Result<Kind, NoticeError> {
    // SAFETY: F_GETFL on an open fd reads its status flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(NoticeError::Take(std::io::Error::last_os_error()));
    }
    // The access mode of the open file itself: what the task may do with it, checked by the
    // kernel when the task (or whoever gave it the file) opened it.
    let mode = flags & libc::O_ACCMODE;
    if mode != libc::O_WRONLY && mode != libc::O_RDWR {
        return Err(NoticeError::NotWritable);
    }
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| NoticeError::Take(e.into()))?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFIFO => Ok(Kind::Pipe),
        libc::S_IFREG => Ok(Kind::File),
        // SAFETY: isatty only queries the fd.
        libc::S_IFCHR if unsafe { libc::isatty(fd.as_raw_fd()) } == 1 => Ok(Kind::Tty),
        _ => Err(NoticeError::NotAllowed),
    }
}

/// Whether the pipe behind `fd` can take `len` more bytes without blocking. (The task is
/// stopped; another writer could fill it meanwhile, which is why the write itself asks not to
/// wait too.)
fn pipe_has_room(fd: &OwnedFd, len: usize) -> bool {
    // SAFETY: F_GETPIPE_SZ on a pipe returns its capacity.
    let size = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD writes the number of unread bytes into the int we pass.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut unread) };
    size > 0 && r == 0 && (size as usize).saturating_sub(unread.max(0) as usize) >= len
}

/// Writes `bytes` at the file's current position (appending where the task appends), asking
/// the kernel not to wait; where it does not take that flag, a plain write (a pipe checked for
/// room, a terminal, a regular file).
fn write_nowait(fd: &OwnedFd, bytes: &[u8]) -> Result<(), NoticeError> {
    let iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: one iovec over `bytes`, which outlives the call; offset -1 is the current
    // position.
    let n = unsafe { libc::pwritev2(fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
    if n >= 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EINVAL) => {
            // SAFETY: writes from `bytes`, valid for its length.
            let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            if n < 0 {
                Err(NoticeError::Write(std::io::Error::last_os_error()))
            } else {
                Ok(())
            }
        }
        Some(libc::EAGAIN) => Err(NoticeError::Full),
        _ => Err(NoticeError::Write(e)),
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Agent-controlled text made safe for a terminal: control characters (escape sequences,
/// carriage returns, newlines) are shown as `\e`, `\r`, `\n` or `\xNN`, and the text is cut
/// to [`MAX_WHAT`] characters with an ellipsis.
pub fn quote(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == MAX_WHAT {
            out.push('…');
            break;
        }
        match c {
            '\x1b' => out.push_str("\\e"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// How long a hold may wait, for people: `45s`, `2m`, `1h30m`.
pub fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 && s % 60 == 0 => format!("{}m", s / 60),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// The line written when an action is held: what, which request, how long, where to look.
pub fn held_line(what: &str, request: &str, wait: Option<u64>, url: &str) -> String {
    let how_long = match wait {
        Some(secs) => format!("up to {}", duration(secs)),
        None => "until someone decides".to_owned(),
    };
    let mut line = format!(
        "airlock: \"{}\" is waiting for approval (request {}, {how_long})",
        quote(what),
        quote(request)
    );
    if !url.is_empty() {
        let _ = write!(line, ": {}/requests/{}", quote(url), quote(request));
    }
    line
}

/// The line written when an action is decided: `approved by alice`, `denied by bob: "not
/// during the freeze"`, `expired: no decision in 2m; denied`.
pub fn decided_line(allow: bool, cause: &str, by: &str, reason: &str) -> String {
    let verdict = if allow { "approved" } else { "denied" };
    let mut line = match cause {
        "timeout" => format!("airlock: expired: no decision in time; {verdict}"),
        "too-many-pending" => "airlock: denied at once: too many pending requests".to_owned(),
        "decider-unreachable" => {
            format!("airlock: the control plane is unreachable; {verdict} (fail mode)")
        }
        _ if by.is_empty() => format!("airlock: {verdict}"),
        _ => format!("airlock: {verdict} by {}", quote(by)),
    };
    if !reason.is_empty() {
        let _ = write!(line, ": \"{}\"", quote(reason));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn escapes_what_a_task_controls() {
        let q = quote("kubectl get pods\x1b[8m\r\nrm -rf \"/\"\x07");
        assert_eq!(q, "kubectl get pods\\e[8m\\r\\nrm -rf \\\"/\\\"\\x07");
        assert!(!q.chars().any(char::is_control));
        let long = "x".repeat(500);
        assert_eq!(quote(&long).chars().count(), MAX_WHAT + 1);
    }

    #[test]
    fn lines_say_what_and_why() {
        assert_eq!(
            held_line(
                "kubectl delete namespace payments",
                "h-1",
                Some(120),
                "https://airlock.example"
            ),
            "airlock: \"kubectl delete namespace payments\" is waiting for approval (request h-1, up to 2m): https://airlock.example/requests/h-1"
        );
        assert_eq!(
            held_line("x", "r", None, ""),
            "airlock: \"x\" is waiting for approval (request r, until someone decides)"
        );
        assert_eq!(
            decided_line(false, "decision", "bob", "not during the freeze"),
            "airlock: denied by bob: \"not during the freeze\""
        );
        assert_eq!(
            decided_line(true, "decision", "alice", ""),
            "airlock: approved by alice"
        );
        assert_eq!(
            decided_line(false, "timeout", "", ""),
            "airlock: expired: no decision in time; denied"
        );
        assert_eq!(duration(90), "1m30s");
        assert_eq!(duration(5400), "1h30m");
    }

    /// Spawns `sleep` with `stderr` as its fd 2 and tells it `line`.
    fn tell_child(stderr: std::process::Stdio, line: &str) -> Result<(), NoticeError> {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .stderr(stderr)
            .spawn()
            .expect("spawn sleep");
        let r = tell(child.id(), line);
        let _ = child.kill();
        let _ = child.wait();
        r
    }

    #[test]
    fn writes_into_the_tasks_own_pipe() {
        let (mut reader, writer) = std::io::pipe().expect("pipe");
        tell_child(writer.into(), "airlock: hello").expect("told");
        let mut got = String::new();
        reader.read_to_string(&mut got).expect("read");
        assert_eq!(got, "airlock: hello\n");
    }

    #[test]
    fn leaves_a_read_only_stderr_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "untouched\n").expect("write");
        let ro = std::fs::File::open(&path).expect("open read-only");
        let e = tell_child(ro.into(), "airlock: injected").expect_err("refused");
        assert!(matches!(e, NoticeError::NotWritable), "{e:?}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "untouched\n");
    }

    #[test]
    fn refuses_devices_that_are_not_terminals() {
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .expect("open /dev/null");
        let e = tell_child(null.into(), "airlock: x").expect_err("refused");
        assert!(matches!(e, NoticeError::NotAllowed), "{e:?}");
    }

    #[test]
    fn never_blocks_on_a_full_pipe() {
        let (_reader, writer) = std::io::pipe().expect("pipe");
        // Fill the pipe nobody reads.
        let w = writer.try_clone().expect("clone");
        let fd = OwnedFd::from(w);
        // SAFETY: O_NONBLOCK on our own pipe end so that filling it stops at full.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let chunk = [b'x'; 4096];
        // SAFETY: writes from `chunk`, valid for its length.
        while unsafe { libc::write(fd.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) } > 0 {}
        // SAFETY: back to blocking, as a task's stderr would be.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, 0) };
        let start = std::time::Instant::now();
        let e = tell_child(writer.into(), "airlock: x").expect_err("full");
        assert!(matches!(e, NoticeError::Full), "{e:?}");
        assert!(start.elapsed() < std::time::Duration::from_secs(3));
    }
}
