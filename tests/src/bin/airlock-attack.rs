//! Attack programs the guest runs as a watched, unprivileged account, each trying to get a held
//! action through without a decision (or to break an allowed one). One subcommand per attack;
//! each prints one line of results the scenario script turns into `@@R` lines.
//!
//! `CMD...` is the held program and its arguments (normally the `kubectl` stand-in, whose `run`
//! subcommand writes a marker file first thing: the proof that it ran).

use std::{
    ffi::CString,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

fn usage() -> ExitCode {
    eprintln!(
        "usage: airlock-attack sigio MS CMD.. | orphan CMD.. | traceme CMD.. | seize CMD.. \
         | thread-exec CMD.. | leader-exit CMD.. | memfd FILE ARGS.. | argv0 ARGV0 FILE ARGS.. \
         | tfo ADDR PORT | udp-sendto ADDR PORT [N] | udp-sendmmsg ADDR PORT \
         | udp-sendto-unspec ADDR PORT | udp-listen PORT FILE | uring-connect ADDR PORT \
         | zombie-leader-connect ADDR PORT | sctp-connectx ADDR PORT | fork-many N \
         | reuse-pid PID CMD.."
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        return usage();
    };
    let result = match cmd.as_str() {
        "sigio" => sigio(rest),
        "orphan" => orphan(rest),
        "traceme" => traced(rest, false),
        "seize" => traced(rest, true),
        "thread-exec" => thread_exec(rest, false),
        "leader-exit" => thread_exec(rest, true),
        "memfd" => memfd(rest),
        "argv0" => argv0(rest),
        "tfo" => tfo(rest),
        "udp-sendto" => udp(rest, false),
        "udp-sendmmsg" => udp(rest, true),
        "udp-sendto-unspec" => udp_unspec(rest),
        "udp-listen" => udp_listen(rest),
        "sctp-connectx" => sctp_connectx(rest),
        "reuse-pid" => reuse_pid(rest),
        "uring-connect" => uring_connect(rest),
        "zombie-leader-connect" => zombie_leader_connect(rest),
        "fork-many" => fork_many(rest),
        _ => return usage(),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error {e}");
            ExitCode::from(1)
        }
    }
}

type Res = Result<String, String>;

/// `F_SETSIG` from <fcntl.h> (Linux), which the libc crate does not export.
const F_SETSIG: libc::c_int = 10;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn cstrings(args: &[String]) -> Result<Vec<CString>, String> {
    args.iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|e| e.to_string()))
        .collect()
}

/// In a forked child: sends its standard output to /dev/null, so that the held program's own
/// output does not mix with the attack's result line.
fn quiet_stdout() {
    // SAFETY: open and dup2 on the child's own descriptors.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::close(null);
        }
    }
}

/// Ends the calling thread only (not the process): the raw exit(2) system call. The
/// thread-group leader that calls it stays a zombie while the other threads live on.
/// (pthread_exit would unwind through Rust's runtime, which aborts.)
fn exit_thread() -> ! {
    // SAFETY: SYS_exit ends this thread; nothing of it runs afterwards.
    unsafe { libc::syscall(libc::SYS_exit, 0) };
    unreachable!("exit(2) returned")
}

/// execv(argv[0], argv); returns only on failure.
fn exec(argv: &[String]) -> String {
    let Ok(c) = cstrings(argv) else {
        return "bad argument".into();
    };
    let Some(prog) = c.first() else {
        return "no program".into();
    };
    let mut ptrs: Vec<*const libc::c_char> = c.iter().map(|s| s.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: NUL-terminated strings and a NULL-terminated array that outlive the call.
    unsafe { libc::execv(prog.as_ptr(), ptrs.as_ptr()) };
    format!("exec failed: errno {}", errno())
}

fn fork() -> Result<libc::pid_t, String> {
    // SAFETY: the child only calls async-signal-safe functions or execs (single-threaded here).
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: errno {}", errno())),
        pid => Ok(pid),
    }
}

fn status_text(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit={}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal={}", libc::WTERMSIG(status))
    } else {
        format!("status={status:#x}")
    }
}

fn wait(pid: libc::pid_t) -> String {
    let mut status = 0;
    // SAFETY: plain waitpid on our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return format!("wait-error={}", errno());
    }
    status_text(status)
}

/// The state letter of `pid` in /proc (`-` when gone).
fn state(pid: libc::pid_t) -> char {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next())
        })
        .unwrap_or('-')
}

fn wait_for_state(pid: libc::pid_t, want: &[char], limit: Duration) -> char {
    let start = Instant::now();
    loop {
        let s = state(pid);
        if want.contains(&s) || s == '-' || start.elapsed() > limit {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs CMD in a child; once it is held (stopped), sends it SIGCONT for a second through the
/// SIGIO path: F_SETOWN + F_SETSIG(SIGCONT) + O_ASYNC on a pipe, then writes to the pipe.
/// That signal is sent by the kernel's fasync code, not by kill(2).
fn sigio(args: &[String]) -> Res {
    let (ms, cmd) = args.split_first().ok_or("no delay")?;
    let delay: u64 = ms.parse().map_err(|_| "bad delay")?;
    let child = fork()?;
    if child == 0 {
        quiet_stdout();
        let err = exec(cmd);
        eprintln!("{err}");
        std::process::exit(127);
    }
    std::thread::sleep(Duration::from_millis(delay));
    let held = state(child);
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) } != 0 {
        return Err(format!("pipe: errno {}", errno()));
    }
    let (r, w) = (fds[0], fds[1]);
    // SAFETY: fcntl on our own fds; F_SETOWN names the held child as the SIGIO target.
    let setup = unsafe {
        libc::fcntl(r, libc::F_SETOWN, child) == 0
            && libc::fcntl(r, F_SETSIG, libc::SIGCONT) == 0
            && libc::fcntl(r, libc::F_SETFL, libc::O_ASYNC | libc::O_NONBLOCK) == 0
    };
    if !setup {
        return Err(format!("fcntl: errno {}", errno()));
    }
    let mut sent = 0;
    let mut buf = [0u8; 64];
    for _ in 0..20 {
        // SAFETY: one byte to our own pipe, then drain it so the next write signals again.
        unsafe {
            if libc::write(w, b"x".as_ptr().cast(), 1) == 1 {
                sent += 1;
            }
            libc::read(r, buf.as_mut_ptr().cast(), buf.len());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = state(child);
    Ok(format!(
        "held={held} after={after} sent={sent} {}",
        wait(child)
    ))
}

/// A middle process starts CMD in a process group of its own with SIGHUP ignored (`nohup cmd &`
/// shapes), waits until it is held, and exits: the group is orphaned with a stopped member, and
/// the kernel itself sends it SIGHUP and SIGCONT. Prints CMD's pid, which is then nobody's child
/// here (the caller checks its marker and that it is gone).
fn orphan(cmd: &[String]) -> Res {
    // A session of our own, so that the child's new parent (init) is outside it.
    // SAFETY: plain syscall; failing (already a group leader) leaves the old session.
    unsafe { libc::setsid() };
    let mut fds = [0; 2];
    // SAFETY: pipe fills two fds.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: errno {}", errno()));
    }
    let middle = fork()?;
    if middle == 0 {
        let child = match fork() {
            Ok(c) => c,
            Err(_) => std::process::exit(1),
        };
        if child == 0 {
            quiet_stdout();
            // SAFETY: plain syscalls in the child before exec.
            unsafe {
                libc::setpgid(0, 0);
                libc::signal(libc::SIGHUP, libc::SIG_IGN);
            }
            let err = exec(cmd);
            eprintln!("{err}");
            std::process::exit(127);
        }
        let bytes = child.to_ne_bytes();
        // SAFETY: writes 4 bytes to the pipe.
        unsafe { libc::write(fds[1], bytes.as_ptr().cast(), bytes.len()) };
        let held = wait_for_state(child, &['T', 't'], Duration::from_secs(10));
        // Exit now: the child's group becomes orphaned while it is stopped.
        std::process::exit(if held == 'T' || held == 't' { 0 } else { 3 });
    }
    let mut bytes = [0u8; 4];
    // SAFETY: reads 4 bytes from the pipe.
    let n = unsafe { libc::read(fds[0], bytes.as_mut_ptr().cast(), 4) };
    if n != 4 {
        return Err("no pid from the middle process".into());
    }
    let child = libc::pid_t::from_ne_bytes(bytes);
    let middle_status = wait(middle);
    std::thread::sleep(Duration::from_millis(300));
    Ok(format!(
        "pid={child} middle={middle_status} after={}",
        state(child)
    ))
}

/// CMD runs under a tracer that was there before the hold (PTRACE_TRACEME in the child, or
/// PTRACE_SEIZE by the parent before the exec). The tracer continues every stop with
/// PTRACE_CONT and no signal, swallowing the SIGSTOP that holds it.
fn traced(cmd: &[String], seize: bool) -> Res {
    let child = fork()?;
    if child == 0 {
        quiet_stdout();
        // SAFETY: plain syscalls in the child before exec.
        unsafe {
            if !seize {
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                libc::raise(libc::SIGSTOP);
            } else {
                libc::usleep(300_000);
            }
        }
        let err = exec(cmd);
        eprintln!("{err}");
        std::process::exit(127);
    }
    if seize {
        // SAFETY: attaches to our own child.
        if unsafe { libc::ptrace(libc::PTRACE_SEIZE, child, 0, 0) } != 0 {
            return Err(format!("seize: errno {}", errno()));
        }
    }
    let mut conts = 0;
    loop {
        let mut status = 0;
        // SAFETY: waits for our own (traced) child.
        if unsafe { libc::waitpid(child, &mut status, libc::__WALL) } < 0 {
            return Err(format!("wait: errno {}", errno()));
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Ok(format!("conts={conts} {}", status_text(status)));
        }
        conts += 1;
        // SAFETY: resumes our tracee, swallowing whatever stopped it.
        unsafe { libc::ptrace(libc::PTRACE_CONT, child, 0, 0) };
    }
}

/// A thread that is not the thread-group leader execs CMD. With `leader_exit`, the leader first
/// leaves with pthread_exit, so the process lives on without it (state tied to the leader is
/// lost); otherwise the leader waits and the exec replaces it.
fn thread_exec(cmd: &[String], leader_exit: bool) -> Res {
    let cmd = cmd.to_vec();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(if leader_exit { 300 } else { 50 }));
        let err = exec(&cmd);
        eprintln!("{err}");
        std::process::exit(127);
    });
    if leader_exit {
        exit_thread();
    }
    std::thread::sleep(Duration::from_secs(60));
    Err("exec did not happen".into())
}

/// Copies FILE into an anonymous memfd and runs it from there with fexecve: a new inode that no
/// rule names.
fn memfd(args: &[String]) -> Res {
    let (file, rest) = args.split_first().ok_or("no file")?;
    let name = CString::new("kubectl").map_err(|e| e.to_string())?;
    // SAFETY: memfd_create with a valid name; the fd is owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if fd < 0 {
        return Err(format!("memfd_create: errno {}", errno()));
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let mut mem = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let bytes = std::fs::read(file).map_err(|e| e.to_string())?;
    mem.write_all(&bytes).map_err(|e| e.to_string())?;
    let mut argv = vec!["kubectl".to_owned()];
    argv.extend(rest.iter().cloned());
    let c = cstrings(&argv)?;
    let mut ptrs: Vec<*const libc::c_char> = c.iter().map(|s| s.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let env: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: valid fd, NULL-terminated argv and envp.
    unsafe { libc::fexecve(mem.as_raw_fd(), ptrs.as_ptr(), env.as_ptr()) };
    Err(format!("fexecve: errno {}", errno()))
}

/// execv(FILE, [ARGV0, ARGS...]): argv[0] is the caller's choice, even empty.
fn argv0(args: &[String]) -> Res {
    let [argv0, file, rest @ ..] = args else {
        return Err("need ARGV0 FILE".into());
    };
    let err = Command::new(file).arg0(argv0).args(rest).exec();
    Err(err.to_string())
}

fn target(args: &[String]) -> Result<SocketAddr, String> {
    let [addr, port, ..] = args else {
        return Err("need ADDR PORT".into());
    };
    let ip: std::net::IpAddr = addr.parse().map_err(|_| "bad address")?;
    let port: u16 = port.parse().map_err(|_| "bad port")?;
    Ok(SocketAddr::new(ip, port))
}

/// A raw sockaddr for `dst`, and its length.
fn sockaddr(dst: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match dst {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn socket(dst: SocketAddr, ty: libc::c_int) -> Result<OwnedFd, String> {
    let family = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket call; the fd is owned below.
    let fd = unsafe { libc::socket(family, ty, 0) };
    if fd < 0 {
        return Err(format!("socket: errno {}", errno()));
    }
    // SAFETY: fresh valid fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// TCP Fast Open: sendto(MSG_FASTOPEN) on an unconnected socket connects and sends in one call,
/// without connect(2). Prints `ok <reply>` or `err <errno>`.
fn tfo(args: &[String]) -> Res {
    let dst = target(args)?;
    let s = socket(dst, libc::SOCK_STREAM)?;
    let (ss, len) = sockaddr(dst);
    let msg = b"ping\n";
    // SAFETY: valid socket, buffer and address.
    let n = unsafe {
        libc::sendto(
            s.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_FASTOPEN,
            &ss as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if n < 0 {
        return Ok(format!("err {}", errno()));
    }
    let mut stream = TcpStream::from(s);
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(n) => Ok(format!("ok {}", String::from_utf8_lossy(&buf[..n]).trim())),
        Err(e) => Ok(format!("err {}", e.raw_os_error().unwrap_or(0))),
    }
}

/// Unconnected UDP: sendto N times on one socket (default once), or sendmmsg with two
/// datagrams, straight to the destination, no connect(2). Prints `ok <datagrams sent>` or
/// `err <errno>` (the first error).
fn udp(args: &[String], mmsg: bool) -> Res {
    let dst = target(args)?;
    let s = socket(dst, libc::SOCK_DGRAM)?;
    let (mut ss, len) = sockaddr(dst);
    let msg = b"ping\n";
    if !mmsg {
        let times: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1);
        for i in 0..times {
            // SAFETY: valid socket, buffer and address.
            let n = unsafe {
                libc::sendto(
                    s.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    &ss as *const _ as *const libc::sockaddr,
                    len,
                )
            };
            if n < 0 {
                return Ok(format!("err {} after {i}", errno()));
            }
        }
        return Ok(format!("ok {times}"));
    }
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut _,
        iov_len: msg.len(),
    };
    // SAFETY: zeroed mmsghdr is valid; fields set below point at live locals.
    let mut hdrs: [libc::mmsghdr; 2] = unsafe { std::mem::zeroed() };
    for h in &mut hdrs {
        h.msg_hdr.msg_name = &mut ss as *mut _ as *mut libc::c_void;
        h.msg_hdr.msg_namelen = len;
        h.msg_hdr.msg_iov = &mut iov;
        h.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: two valid message headers.
    let n = unsafe { libc::sendmmsg(s.as_raw_fd(), hdrs.as_mut_ptr(), 2, 0) };
    Ok(if n < 0 {
        format!("err {}", errno())
    } else {
        format!("ok {n}")
    })
}

/// sendto on an unconnected IPv4 UDP socket with a `sockaddr_in` whose family is AF_UNSPEC:
/// udp_sendmsg takes it as IPv4. Prints `ok 1` or `err <errno>`.
fn udp_unspec(args: &[String]) -> Res {
    let dst = target(args)?;
    let SocketAddr::V4(v4) = dst else {
        return Err("IPv4 only".into());
    };
    let s = socket(dst, libc::SOCK_DGRAM)?;
    // SAFETY: an all-zero sockaddr_in is valid; the family stays AF_UNSPEC (0).
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_port = v4.port().to_be();
    sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
    let msg = b"ping\n";
    // SAFETY: valid socket, buffer and address.
    let n = unsafe {
        libc::sendto(
            s.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            &sin as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    Ok(if n < 0 {
        format!("err {}", errno())
    } else {
        "ok 1".into()
    })
}

/// SCTP's connectx (setsockopt SCTP_SOCKOPT_CONNECTX with a list of addresses), which does
/// not go through connect(2). Prints `ok` or `err <errno>`.
fn sctp_connectx(args: &[String]) -> Res {
    const IPPROTO_SCTP: libc::c_int = 132;
    const SOL_SCTP: libc::c_int = 132;
    const SCTP_SOCKOPT_CONNECTX: libc::c_int = 110;
    let dst = target(args)?;
    let family = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket call; the fd is owned below.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM, IPPROTO_SCTP) };
    if fd < 0 {
        return Ok(format!("err {} (socket)", errno()));
    }
    // SAFETY: fresh valid fd.
    let s = unsafe { OwnedFd::from_raw_fd(fd) };
    let (ss, len) = sockaddr(dst);
    // SAFETY: a valid socket and an address buffer of `len` bytes.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            SOL_SCTP,
            SCTP_SOCKOPT_CONNECTX,
            &ss as *const _ as *const libc::c_void,
            len,
        )
    };
    Ok(if r < 0 {
        format!("err {}", errno())
    } else {
        "ok".into()
    })
}

/// Forks (children exit at once) until a child gets pid PID, then that child execs CMD. Prints
/// `reused=<forks> <status>`, or `not-reused` after 200000 forks.
fn reuse_pid(args: &[String]) -> Res {
    let (pid, cmd) = args.split_first().ok_or("need PID")?;
    let want: libc::pid_t = pid.parse().map_err(|_| "bad pid")?;
    for forks in 1..=50_000 {
        let child = fork()?;
        if child == 0 {
            // SAFETY: getpid in the child.
            if unsafe { libc::getpid() } == want {
                quiet_stdout();
                let err = exec(cmd);
                eprintln!("{err}");
                std::process::exit(127);
            }
            // SAFETY: leave at once without running destructors.
            unsafe { libc::_exit(0) };
        }
        let status = wait(child);
        if child == want {
            return Ok(format!("reused={forks} {status}"));
        }
    }
    Ok("not-reused".into())
}

/// Appends a line to FILE for every datagram that arrives on UDP PORT (both families), forever.
fn udp_listen(args: &[String]) -> Res {
    let [port, file] = args else {
        return Err("need PORT FILE".into());
    };
    let sock = std::net::UdpSocket::bind(format!("[::]:{port}")).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 512];
    loop {
        let (n, from) = sock.recv_from(&mut buf).map_err(|e| e.to_string())?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .map_err(|e| e.to_string())?;
        let _ = writeln!(f, "{from} {}", String::from_utf8_lossy(&buf[..n]).trim());
    }
}

/// Connects through io_uring (IORING_OP_CONNECT), then, on a new socket of the same thread, with
/// a plain connect(2) to the same destination. Prints both results: `uring=<res> plain=<res>`.
fn uring_connect(args: &[String]) -> Res {
    let dst = target(args)?;
    let s = socket(dst, libc::SOCK_STREAM)?;
    let (ss, len) = sockaddr(dst);
    let mut ring = io_uring::IoUring::new(4).map_err(|e| format!("io_uring: {e}"))?;
    let op = io_uring::opcode::Connect::new(
        io_uring::types::Fd(s.as_raw_fd()),
        &ss as *const _ as *const libc::sockaddr,
        len,
    )
    .build();
    // SAFETY: the address and socket outlive the submission, which completes below.
    unsafe { ring.submission().push(&op) }.map_err(|e| e.to_string())?;
    ring.submit_and_wait(1).map_err(|e| e.to_string())?;
    let res = ring
        .completion()
        .next()
        .map(|c| c.result())
        .ok_or("no completion")?;
    let uring = if res >= 0 {
        "ok".to_owned()
    } else {
        format!("err {}", -res)
    };
    let plain = match TcpStream::connect_timeout(&dst, Duration::from_secs(20)) {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
    };
    Ok(format!("uring={uring} plain={plain}"))
}

/// The leader leaves with pthread_exit (it stays a zombie while the process lives on); another
/// thread then connects. Prints the connect's result from that thread.
fn zombie_leader_connect(args: &[String]) -> Res {
    let dst = target(args)?;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let line = match TcpStream::connect_timeout(&dst, Duration::from_secs(30)) {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
        };
        println!("{line}");
        let _ = std::io::stdout().flush();
        std::process::exit(0);
    });
    exit_thread();
}

/// Forks N children that each sleep 2 s; prints how many forks succeeded and how many failed.
fn fork_many(args: &[String]) -> Res {
    let n: usize = args.first().and_then(|n| n.parse().ok()).ok_or("need N")?;
    let (mut ok, mut failed, mut last_err) = (0, 0, 0);
    let mut kids = Vec::new();
    for _ in 0..n {
        match fork() {
            Ok(0) => {
                std::thread::sleep(Duration::from_secs(2));
                std::process::exit(0);
            }
            Ok(pid) => {
                ok += 1;
                kids.push(pid);
            }
            Err(_) => {
                failed += 1;
                last_err = errno();
            }
        }
    }
    for k in kids {
        wait(k);
    }
    Ok(format!("forked={ok} failed={failed} errno={last_err}"))
}
