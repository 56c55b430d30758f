//! Attacks on the listeners themselves: sockets that connect and say nothing, send a request's
//! headers one byte at a time, or stop half-way through a TLS handshake. Each must be closed
//! within `[connections]`' deadlines, and a flood of them must not lock agents or browsers
//! out, even when the server has few file descriptors. The real `airlock-server` binary.

#[path = "support/server.rs"]
mod server;

use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Deadlines of one second, small caps.
const CONFIG: &str = r#"
[connections]
handshake_timeout_secs = 1
header_timeout_secs = 1
max_grpc_connections = 24
max_http_connections = 24
"#;

fn start(dir: &Path, extra: &[&OsStr]) -> Server {
    start_with(dir, CONFIG, extra)
}

fn start_with(dir: &Path, config_text: &str, extra: &[&OsStr]) -> Server {
    let config = dir.join("server.toml");
    std::fs::write(&config, config_text).unwrap();
    let db = format!("sqlite://{}", dir.join("airlock.db").display());
    let mut args: Vec<&OsStr> = vec![OsStr::new("--config"), config.as_os_str()];
    args.extend_from_slice(extra);
    Server::start(dir, &db, &args)
}

fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.trim_end_matches('/').to_owned()
}

/// How long until the server closes `conn` (EOF or reset); `None` if still open after `limit`.
async fn closed_after(conn: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + limit).into(), conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            // The server's own first bytes (HTTP/2 settings): keep waiting for the close.
            Ok(Ok(_)) => {}
        }
    }
}

async fn grpc_health(url: &str) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .map(drop)
        .map_err(|e| format!("check: {e}"))
}

#[tokio::test]
async fn silent_and_slow_connections_are_closed_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let grpc = host_port(&server.grpc_url());
    let http = host_port(&server.http_url());
    let limit = Duration::from_secs(5);

    // gRPC: says nothing.
    let mut silent = TcpStream::connect(&grpc).await.unwrap();
    // gRPC: half of the HTTP/2 preface, then nothing.
    let mut half = TcpStream::connect(&grpc).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // HTTP: says nothing.
    let mut http_silent = TcpStream::connect(&http).await.unwrap();
    // HTTP: a request's headers a byte at a time, never finished.
    let mut slowloris = TcpStream::connect(&http).await.unwrap();
    let drip = tokio::spawn(async move {
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slowloris.write_all(&[*b]).await.is_err() {
                return Some(());
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        closed_after(&mut slowloris, Duration::from_secs(5))
            .await
            .map(drop)
    });
    for (what, conn) in [
        ("silent gRPC", &mut silent),
        ("half a preface", &mut half),
        ("silent HTTP", &mut http_silent),
    ] {
        let took = closed_after(conn, limit).await;
        assert!(
            took.is_some(),
            "the server kept a {what} connection open past {limit:?}"
        );
    }
    assert!(
        drip.await.unwrap().is_some(),
        "the server kept reading a request's headers sent a byte at a time past the header timeout"
    );

    // A well-behaved client is served as before, and a kept-alive HTTP connection works.
    grpc_health(&server.grpc_url()).await.unwrap();
    let client = reqwest::Client::new();
    for _ in 0..2 {
        let r = client
            .get(format!("{}healthz", server.http_url()))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
}

#[tokio::test]
async fn a_tls_handshake_left_half_way_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let server = start(
        dir.path(),
        &[
            OsStr::new("--tls-cert"),
            cert_file.as_os_str(),
            OsStr::new("--tls-key"),
            key_file.as_os_str(),
        ],
    );
    let mut conn = TcpStream::connect(host_port(&server.grpc_url()))
        .await
        .unwrap();
    // A handshake record announcing a 512-byte ClientHello, of which only the start comes: more
    // than the first bytes owed, so only the TLS handshake timeout can end it.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.extend_from_slice(&[0u8; 32]);
    conn.write_all(&hello).await.unwrap();
    assert!(
        closed_after(&mut conn, Duration::from_secs(5))
            .await
            .is_some(),
        "the server waited more than 5 s for the rest of a TLS ClientHello"
    );
}

/// Lowers the server's open-file limit to what it uses now plus `spare`.
fn squeeze_fds(server: &Server, spare: u64) {
    let pid = server.child.id();
    let used = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let limit = libc::rlimit {
        rlim_cur: used + spare,
        rlim_max: used + spare,
    };
    // SAFETY: prlimit on our own child with a valid rlimit and no old-value pointer.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[tokio::test]
async fn a_flood_of_idle_connections_does_not_lock_out_agents_or_browsers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    // Room for the two caps (24 each) and a little more: a flood without the caps and
    // deadlines runs the server out of descriptors.
    squeeze_fds(&server, 60);
    let grpc = host_port(&server.grpc_url());
    let http = host_port(&server.http_url());
    let mut flood = Vec::new();
    for _ in 0..150 {
        for addr in [&grpc, &http] {
            // Connects complete in the kernel's backlog even when the server cannot accept.
            if let Ok(Ok(c)) =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
            {
                flood.push(c);
            }
        }
    }
    assert!(flood.len() > 100, "only {} flood connections", flood.len());

    // Sent while the flood is still open: each must be served once the deadlines clear it.
    let started = Instant::now();
    let browser = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let grpc_url = server.grpc_url();
    let (agent, browser) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(20), grpc_health(&grpc_url)),
        browser.get(format!("{}healthz", server.http_url())).send(),
    );
    let agent = agent
        .map_err(|_| "no answer in 20 s".to_owned())
        .and_then(|r| r);
    assert!(
        agent.is_ok(),
        "a gRPC client was locked out by 150 idle connections: {agent:?}; log:\n{}",
        server.log.lock().unwrap()
    );
    assert!(
        browser.as_ref().is_ok_and(|r| r.status().is_success()),
        "an HTTP client was locked out by 150 idle connections: {browser:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "served only after {:?}",
        started.elapsed()
    );
    drop(flood);
}

/// Four gRPC places, and two seconds to make an authenticated call.
const FEW_PLACES: &str = r#"
[connections]
handshake_timeout_secs = 1
auth_timeout_secs = 2
max_grpc_connections = 4
"#;

/// An HTTP/2 connection that says the preface and its settings, acknowledges the server's, and
/// then stays: a valid, idle peer that never authenticates.
async fn idle_http2(addr: &str) -> TcpStream {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // SETTINGS (empty), then SETTINGS with ACK.
    conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    conn.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.unwrap();
    conn
}

/// A gRPC channel over one TCP connection made by us, counting the connections it makes.
async fn counted_channel(
    url: &str,
    made: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> tonic::transport::Channel {
    let addr = host_port(url);
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(20))
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let (addr, made) = (addr.clone(), made.clone());
            async move {
                made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                TcpStream::connect(addr)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .unwrap()
}

#[tokio::test]
async fn connections_that_never_authenticate_give_up_their_places() {
    use airlock_proto::v1::{policy_service_client::PolicyServiceClient, GetPolicyRequest};
    use std::sync::{atomic::AtomicUsize, Arc};

    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), FEW_PLACES, &[]);
    let token = server
        .printed_word("alk_")
        .unwrap_or_else(|| panic!("no admin token in {}", server.printed));
    let url = server.grpc_url();
    let grpc = host_port(&url);

    // All four places: two idle HTTP/2 peers, and two clients that call the unauthenticated
    // health service every half second (busy, and still nobody).
    let mut idle = [idle_http2(&grpc).await, idle_http2(&grpc).await];
    let mut checkers = Vec::new();
    for _ in 0..2 {
        let ch = counted_channel(&url, Arc::new(AtomicUsize::new(0))).await;
        checkers.push(tokio::spawn(async move {
            let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
            loop {
                let _ = health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // An approver's client: it must be served once the nobodies' time is up.
    let made = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let call = async {
        let ch = counted_channel(&url, made.clone()).await;
        let bearer = bearer.clone();
        let mut client =
            PolicyServiceClient::with_interceptor(ch, move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", bearer.clone());
                Ok(r)
            });
        client.get(GetPolicyRequest {}).await.map(|_| client)
    };
    let client = tokio::time::timeout(Duration::from_secs(15), call).await;
    let mut client = match client {
        Ok(Ok(client)) => client,
        other => panic!(
            "an approver was locked out by four connections that never authenticated \
             ({:?} later): {other:?}",
            started.elapsed()
        ),
    };
    for (n, conn) in idle.iter_mut().enumerate() {
        assert!(
            closed_after(conn, Duration::from_secs(5)).await.is_some(),
            "idle HTTP/2 connection {n} was still open {:?} after the approver was served",
            started.elapsed()
        );
    }

    // An authenticated connection keeps its place past the time: the next call, 3 s later,
    // goes over the same connection.
    tokio::time::sleep(Duration::from_secs(3)).await;
    client.get(GetPolicyRequest {}).await.expect("second call");
    assert_eq!(
        made.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the authenticated connection was closed and made again"
    );
    for c in checkers {
        c.abort();
    }
}

#[tokio::test]
async fn a_peer_that_never_reads_is_closed_at_the_auth_deadline_too() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), FEW_PLACES, &[]);
    let addr: std::net::SocketAddr = host_port(&server.grpc_url()).parse().unwrap();
    // A small receive buffer: the server's answers (pongs) back up at once.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    // PINGs, never reading the pongs: once the server cannot send them it stops reading too,
    // and only a deadline that also watches its writes can end the connection.
    let ping = [0u8, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let batch: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 1000)
        .collect();
    let started = Instant::now();
    let closed = loop {
        match tokio::time::timeout_at(
            (started + Duration::from_secs(10)).into(),
            conn.write_all(&batch),
        )
        .await
        {
            Err(_) => break None,
            Ok(Err(_)) => break Some(started.elapsed()),
            Ok(Ok(())) => {}
        }
    };
    assert!(
        closed.is_some_and(|t| t < Duration::from_secs(8)),
        "a peer that never reads its answers kept its place past the 2 s auth time: closed \
         after {closed:?}"
    );
}
