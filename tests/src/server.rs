//! The real `airlock-server` binary on this host, for guest tests: restartable on the same
//! ports and data directory, reachable from a QEMU guest at 10.0.2.2.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Result;

/// One `airlock-server` process and what it needs to be started again.
pub struct Server {
    /// The binary.
    pub bin: PathBuf,
    /// Its data directory (SQLite file, audit head, log).
    pub data: PathBuf,
    /// gRPC port on 127.0.0.1.
    pub grpc: u16,
    /// HTTP (web UI) port on 127.0.0.1.
    pub http: u16,
    /// A server configuration file (`--config`), if any.
    pub config: Option<PathBuf>,
    child: Option<Child>,
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

impl Server {
    /// A server of `bin` on data directory `data` (created), on two free ports; not started.
    pub fn new(bin: PathBuf, data: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&data)?;
        Ok(Self {
            bin,
            data,
            grpc: free_port(),
            http: free_port(),
            config: None,
            child: None,
        })
    }

    /// Runs `airlock-server --data-dir DATA ARGS` (a subcommand) and returns its output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .arg("--data-dir")
            .arg(&self.data)
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "airlock-server {args:?} failed: {out:?}"
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// Starts the server (its log appended to DATA/server.log) and waits for both ports.
    pub fn start(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--data-dir").arg(&self.data);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        let child = cmd
            .args(["--grpc", &format!("127.0.0.1:{}", self.grpc)])
            .args(["--http", &format!("127.0.0.1:{}", self.http)])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.data.join("server.log"))?,
            )
            .spawn()?;
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.http)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", self.grpc)).is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("airlock-server did not start")
    }

    /// Stops the server with SIGTERM (the graceful path a systemd stop takes) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a stopped server kept in its SQLite file, for a test to check.
pub struct Records {
    /// Every request (up to 1000), newest first.
    pub requests: Vec<airlock_proto::v1::HeldRequest>,
    /// The whole audit trail.
    pub audit: Vec<airlock_control_plane::audit::Record>,
    /// The audit chain's verification: the number of records, or why it failed.
    pub verified: Result<i64, String>,
}

impl Records {
    /// Reads the SQLite database `db` of a stopped server (on a runtime of its own).
    pub fn read(db: &std::path::Path) -> Result<Self> {
        use airlock_control_plane::store::{Database, Store};
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(async {
            let store = Store::open(&Database::sqlite(db)).await?;
            let requests = store
                .list(
                    &airlock_proto::v1::ListRequestsRequest {
                        limit: 1000,
                        ..Default::default()
                    },
                    1000,
                )
                .await?
                .0;
            let audit = store
                .audit_query(&airlock_control_plane::audit::Filter::default())
                .await?;
            let verified = store.verify_audit().await.map_err(|e| e.to_string());
            Ok(Self {
                requests,
                audit,
                verified,
            })
        })
    }
}

/// Ends a guest test's run against `server`: stops the server (SIGTERM), keeps the guest's
/// console and the server's log under `keep` ([`keep_logs`], as `test`), fails if the guest's
/// script did not run to its end, and reads what the server recorded.
pub fn finish(
    server: &std::sync::Mutex<Server>,
    keep: &std::path::Path,
    test: &str,
    kernel: &str,
    run: &crate::vm::GuestRun,
) -> Result<Records> {
    let data = {
        let mut s = server.lock().unwrap_or_else(|p| p.into_inner());
        s.stop();
        s.data.clone()
    };
    keep_logs(keep, test, kernel, &run.console, &data)?;
    anyhow::ensure!(
        run.finished(),
        "guest script did not finish:\n{}",
        run.console
    );
    Records::read(&data.join("airlock.db"))
}

/// Keeps a guest run's console and the server's log (from data directory `data`) under the
/// test's target tmp directory `keep`, as `{test}-console-{kernel}.log` and
/// `{test}-server-{kernel}.log`, for a failing run to be read.
pub fn keep_logs(
    keep: &std::path::Path,
    test: &str,
    kernel: &str,
    console: &str,
    data: &std::path::Path,
) -> Result<()> {
    std::fs::write(keep.join(format!("{test}-console-{kernel}.log")), console)?;
    std::fs::copy(
        data.join("server.log"),
        keep.join(format!("{test}-server-{kernel}.log")),
    )?;
    Ok(())
}
