//! The programs the guest runs in tests: a stand-in for privileged tools (copies of this binary
//! are installed as `kubectl` and friends), network clients and servers, and probes.
//!
//! Which tool it is comes from the first argument, or from its name when installed as the
//! setuid helper.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::{CommandExt, ExitStatusExt},
    process::{Command, ExitCode},
    time::Instant,
};

fn usage() -> ExitCode {
    eprintln!(
        "usage: airlock-workload run MARKER CODE [ARGS..] | connect tcp|udp ADDR PORT | serve PORT.. \
         | timed CMD.. | spawn N CMD.. (\"{{i}}\" in CMD is the child index) | ptrace PID \
         | bench-exec N CMD.. | bench-connect N ADDR PORT | bench-send N ADDR PORT \
         | bench-send-connected N ADDR PORT | dns PORT ZONE_FILE"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let name = args
        .first()
        .and_then(|a| a.rsplit('/').next().map(str::to_owned))
        .unwrap_or_default();
    if name == "suid-helper" {
        return suid_exec(&args[1..]);
    }
    if args.len() < 2 {
        return usage();
    }
    let cmd = args.remove(1);
    let rest = &args[1..];
    match cmd.as_str() {
        "run" => run(rest),
        "connect" => connect(rest),
        "serve" => serve(rest),
        "dns" => dns(rest),
        "timed" => timed(rest),
        "spawn" => spawn(rest),
        "ptrace" => ptrace_probe(rest),
        "bench-exec" => bench_exec(rest),
        "bench-connect" => bench_connect(rest),
        "bench-send" => bench_send(rest, false),
        "bench-send-connected" => bench_send(rest, true),
        _ if name != "airlock-workload" => fake_tool(&name, &cmd, rest),
        _ => usage(),
    }
}

/// Installed under a tool's name (`kubectl`, `terraform`) with no subcommand of ours: behave
/// like a harmless stand-in of that tool.
fn fake_tool(name: &str, first: &str, rest: &[String]) -> ExitCode {
    println!(
        "{name} {first} {}: done (demo stand-in, nothing was changed)",
        rest.join(" ")
    );
    ExitCode::SUCCESS
}

/// Writes MARKER first thing (proof that the program ran at all), prints its arguments and
/// exits with CODE.
fn run(args: &[String]) -> ExitCode {
    let (Some(marker), Some(code)) = (args.first(), args.get(1)) else {
        return usage();
    };
    let _ = std::fs::write(marker, b"ran\n");
    println!("ran: {}", args[2..].join(" "));
    ExitCode::from(code.parse::<u8>().unwrap_or(1))
}

/// Connects and exchanges a line; prints `ok <reply>` or `err <errno> <message>`.
fn connect(args: &[String]) -> ExitCode {
    let [proto, addr, port] = args else {
        return usage();
    };
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
        return usage();
    };
    let Ok(port) = port.parse::<u16>() else {
        return usage();
    };
    let target = SocketAddr::new(ip, port);
    let result = match proto.as_str() {
        "tcp" => TcpStream::connect(target).and_then(|mut s| {
            s.write_all(b"ping\n")?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
        }),
        "udp" => {
            let bind = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            UdpSocket::bind(bind).and_then(|s| {
                s.connect(target)?;
                s.send(b"ping\n")?;
                Ok("sent".to_owned())
            })
        }
        _ => return usage(),
    };
    match result {
        Ok(reply) => {
            println!("ok {reply}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("err {} {e}", e.raw_os_error().unwrap_or(0));
            ExitCode::from(1)
        }
    }
}

/// A DNS responder for guest tests, on UDP 127.0.0.1:PORT: answers A queries from ZONE_FILE
/// (lines `NAME IPV4 TTL`, read again for every query, so a test changes answers by writing
/// it), other types with no records, unknown names with NXDOMAIN.
fn dns(args: &[String]) -> ExitCode {
    let [port, zone] = args else {
        return usage();
    };
    let Ok(sock) = UdpSocket::bind(format!("127.0.0.1:{port}")) else {
        eprintln!("cannot listen on udp {port}");
        return ExitCode::from(1);
    };
    println!("dns serving");
    let mut buf = [0u8; 512];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = dns_answer(
            &buf[..n],
            &std::fs::read_to_string(zone).unwrap_or_default(),
        ) {
            let _ = sock.send_to(&reply, from);
        }
    }
}

/// The reply to one DNS query `q` from `zone`; `None` for what is not a query.
fn dns_answer(q: &[u8], zone: &str) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question = &q[12..i + 4];
    let name = labels.join(".");
    let records: Vec<(std::net::Ipv4Addr, u32)> = zone
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (n, a, t) = (w.next()?, w.next()?, w.next()?);
            (n.eq_ignore_ascii_case(&name)).then_some((a.parse().ok()?, t.parse().ok()?))
        })
        .collect();
    let known = zone.lines().any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|n| n.eq_ignore_ascii_case(&name))
    });
    let answers: Vec<_> = if qtype == 1 { records } else { Vec::new() };
    let mut r = Vec::with_capacity(64);
    r.extend_from_slice(&q[0..2]); // id
                                   // QR, opcode 0, RD copied, RA; NXDOMAIN for a name the zone does not have.
    r.extend_from_slice(&[0x80 | (q[2] & 0x01), if known { 0x80 } else { 0x83 }]);
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(question);
    for (addr, ttl) in answers {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&addr.octets());
    }
    Some(r)
}

/// Answers `pong` to every TCP connection on each PORT (dual-stack), forever.
fn serve(args: &[String]) -> ExitCode {
    let mut handles = Vec::new();
    for port in args {
        let Ok(l) = TcpListener::bind(format!("[::]:{port}")) else {
            eprintln!("cannot listen on {port}");
            return ExitCode::from(1);
        };
        handles.push(std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"pong\n");
            }
        }));
    }
    println!("serving");
    for h in handles {
        let _ = h.join();
    }
    ExitCode::SUCCESS
}

fn status_text(st: std::process::ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit={c}"),
        (None, Some(s)) => format!("signal={s}"),
        _ => "unknown".into(),
    }
}

/// Runs CMD and prints `ms=<elapsed> exit=<code>|signal=<sig>`.
fn timed(args: &[String]) -> ExitCode {
    let Some((prog, rest)) = args.split_first() else {
        return usage();
    };
    let start = Instant::now();
    match Command::new(prog).args(rest).status() {
        Ok(st) => println!("ms={} {}", start.elapsed().as_millis(), status_text(st)),
        Err(e) => println!("ms={} spawn-error {e}", start.elapsed().as_millis()),
    }
    ExitCode::SUCCESS
}

/// Starts N copies of CMD at once ("{i}" replaced by the index) and prints `i=<n> <status>`.
fn spawn(args: &[String]) -> ExitCode {
    let Some((n, cmd)) = args.split_first() else {
        return usage();
    };
    let Ok(n) = n.parse::<usize>() else {
        return usage();
    };
    let Some((prog, rest)) = cmd.split_first() else {
        return usage();
    };
    let children: Vec<_> = (0..n)
        .map(|i| {
            let argv: Vec<String> = rest
                .iter()
                .map(|a| a.replace("{i}", &i.to_string()))
                .collect();
            Command::new(prog)
                .args(&argv)
                .stdout(std::process::Stdio::null())
                .spawn()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        match child.and_then(|mut c| c.wait()) {
            Ok(st) => println!("i={i} {}", status_text(st)),
            Err(e) => println!("i={i} error {e}"),
        }
    }
    ExitCode::SUCCESS
}

/// Runs CMD N times, one after the other; prints `us_per_op=<mean> fails=<count>`.
fn bench_exec(args: &[String]) -> ExitCode {
    let Some((n, cmd)) = args.split_first() else {
        return usage();
    };
    let Ok(n) = n.parse::<u32>() else {
        return usage();
    };
    let Some((prog, rest)) = cmd.split_first() else {
        return usage();
    };
    let mut fails = 0;
    let start = Instant::now();
    for _ in 0..n {
        let ok = Command::new(prog)
            .args(rest)
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        fails += u32::from(!ok);
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(n.max(1));
    println!("us_per_op={us:.2} fails={fails}");
    ExitCode::SUCCESS
}

/// Opens and closes N TCP connections to ADDR:PORT; prints `us_per_op=<mean> fails=<count>`.
fn bench_connect(args: &[String]) -> ExitCode {
    let [n, addr, port] = args else {
        return usage();
    };
    let (Ok(n), Ok(ip), Ok(port)) = (
        n.parse::<u32>(),
        addr.parse::<std::net::IpAddr>(),
        port.parse::<u16>(),
    ) else {
        return usage();
    };
    let target = SocketAddr::new(ip, port);
    let mut fails = 0;
    let start = Instant::now();
    for _ in 0..n {
        fails += u32::from(TcpStream::connect(target).is_err());
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(n.max(1));
    println!("us_per_op={us:.2} fails={fails}");
    ExitCode::SUCCESS
}

/// Sends N datagrams from one UDP socket to ADDR:PORT: unconnected, `sendto` with an address
/// each time, or `connected` once and then `send` with none. Prints
/// `us_per_op=<mean> fails=<count>`.
fn bench_send(args: &[String], connected: bool) -> ExitCode {
    let [n, addr, port] = args else {
        return usage();
    };
    let (Ok(n), Ok(ip), Ok(port)) = (
        n.parse::<u32>(),
        addr.parse::<std::net::IpAddr>(),
        port.parse::<u16>(),
    ) else {
        return usage();
    };
    let target = SocketAddr::new(ip, port);
    let bind = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let Ok(socket) = UdpSocket::bind(bind) else {
        println!("us_per_op=0 fails={n}");
        return ExitCode::SUCCESS;
    };
    // A connected socket is told of an unreachable port (ICMP) by the next send's error: a
    // receiver of our own at ADDR:PORT, for as long as the sends last.
    let _sink = connected.then(|| UdpSocket::bind(target).ok());
    if connected && socket.connect(target).is_err() {
        println!("us_per_op=0 fails={n}");
        return ExitCode::SUCCESS;
    }
    let mut fails = 0;
    let start = Instant::now();
    for _ in 0..n {
        let sent = if connected {
            socket.send(b"ping\n")
        } else {
            socket.send_to(b"ping\n", target)
        };
        fails += u32::from(sent.is_err());
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(n.max(1));
    println!("us_per_op={us:.2} fails={fails}");
    ExitCode::SUCCESS
}

/// Tries PTRACE_ATTACH on PID; prints `ok` or `err <errno>`.
fn ptrace_probe(args: &[String]) -> ExitCode {
    let Some(Ok(pid)) = args.first().map(|p| p.parse::<i32>()) else {
        return usage();
    };
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: PTRACE_ATTACH/DETACH take a pid and ignore addr and data.
    let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, null, null) };
    if r == 0 {
        // SAFETY: as above.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, null, null) };
        println!("ok");
    } else {
        println!(
            "err {}",
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        );
    }
    ExitCode::SUCCESS
}

/// Installed setuid root as `suid-helper`: becomes root for real, then runs the rest.
fn suid_exec(args: &[String]) -> ExitCode {
    // SAFETY: plain syscalls; failure shows up as the wrong uid in the test.
    unsafe {
        libc::setgid(0);
        libc::setuid(0);
    }
    let Some((prog, rest)) = args.split_first() else {
        return usage();
    };
    let err = Command::new(prog).args(rest).exec();
    eprintln!("exec {prog}: {err}");
    ExitCode::from(127)
}
