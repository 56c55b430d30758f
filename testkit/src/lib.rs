//! Support shared by the workspace's tests and benchmarks: real PostgreSQL clusters, and
//! [`prometheus`] for reading `/metrics` and dashboard queries.
//!
//! [`Cluster::start`] runs Debian's `initdb` in a temporary directory and starts the server
//! with `pg_ctl` on a free loopback port; dropping the cluster (or, for [`shared`], the end of
//! the process) stops it with `pg_ctl` and removes the directory. PostgreSQL refuses to run as
//! root, so when the caller is root (CI, this project's machines) the cluster's directory is
//! given to `nobody` and every PostgreSQL command runs as that user through `setpriv`.
//!
//! The binaries are found in `AIRLOCK_PG_BIN` if set, else in the newest
//! `/usr/lib/postgresql/*/bin` (Debian's `postgresql` package), else on `PATH`.

pub mod prometheus;

use std::{
    io,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
};

/// `nobody` and `nogroup` on Debian.
const NOBODY: u32 = 65534;

/// How a cluster trades durability for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fsync = off` and friends: for tests, where a crash of the machine loses nothing of
    /// value.
    Fast,
    /// PostgreSQL's defaults (every commit flushed): for benchmarks.
    Durable,
}

/// A running PostgreSQL cluster owned by this process.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_nobody: bool,
}

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AIRLOCK_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).unwrap_or_default()
}

fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn failed(what: &str, out: &Output) -> io::Error {
    io::Error::other(format!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

impl Cluster {
    /// Initialises and starts a cluster; the superuser is `postgres`, trusted on loopback.
    pub fn start(durability: Durability) -> io::Result<Cluster> {
        let bin = bin_dir();
        let as_nobody = unsafe { libc::geteuid() } == 0;
        let dir = tempfile::Builder::new().prefix("airlock-pg-").tempdir()?;
        if as_nobody {
            std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY))?;
        }
        let mut cluster = Cluster {
            dir,
            bin,
            port: 0,
            as_nobody,
        };
        let data = cluster.data();
        let out = cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        if !out.status.success() {
            return Err(failed("initdb", &out));
        }
        cluster.port = free_port()?;
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             max_connections = 400\nshared_buffers = 64MB\n",
            cluster.port,
            cluster.dir.path().display()
        );
        if durability == Durability::Fast {
            conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        let conf_path = Path::new(&data).join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)?;
        text.push_str(&conf);
        std::fs::write(&conf_path, text)?;
        cluster.pg_ctl("start")?;
        Ok(cluster)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        let exe = self.bin.join(program);
        let exe = if exe.exists() {
            exe
        } else {
            PathBuf::from(program)
        };
        let mut cmd = if self.as_nobody {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid",
                &NOBODY.to_string(),
                "--regid",
                &NOBODY.to_string(),
                "--clear-groups",
                "--",
            ])
            .arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("LC_ALL", "C")
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("running {program}: {e}")))
    }

    fn pg_ctl(&self, action: &str) -> io::Result<()> {
        let data = self.data();
        let log = self.dir.path().join("postgres.log").display().to_string();
        let mut args = vec![action, "-D", &data, "-w", "-t", "60", "-l", &log];
        if action != "start" {
            args.extend(["-m", "fast"]);
        }
        let out = self.run("pg_ctl", &args)?;
        if out.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            Err(io::Error::other(format!(
                "{}\n{log}",
                failed(&format!("pg_ctl {action}"), &out)
            )))
        }
    }

    /// Stops the server (fast shutdown: open connections are ended).
    pub fn stop(&self) -> io::Result<()> {
        self.pg_ctl("stop")
    }

    /// Starts the server again after [`Cluster::stop`], on the same port.
    pub fn start_again(&self) -> io::Result<()> {
        self.pg_ctl("start")
    }

    /// Loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` (letters, digits and `_`).
    pub fn create_database(&self, name: &str) -> io::Result<String> {
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "database name {name:?}"
        );
        let port = self.port.to_string();
        let sql = format!("CREATE DATABASE {name}");
        let out = self.run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qc",
                &sql,
            ],
        )?;
        if !out.status.success() {
            return Err(failed("CREATE DATABASE", &out));
        }
        Ok(self.url(name))
    }

    /// A new, empty database with a name not used before in this process.
    pub fn fresh_database(&self) -> io::Result<String> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.create_database(&format!("t{}_{n}", std::process::id()))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

static SHARED: OnceLock<Cluster> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some(c) = SHARED.get() {
        let _ = c.stop();
        let _ = std::fs::remove_dir_all(c.dir.path());
    }
}

/// One fast cluster for the whole process (a test binary), started on first use and stopped
/// when the process exits. Panics with the reason when PostgreSQL cannot start.
pub fn shared() -> &'static Cluster {
    SHARED.get_or_init(|| {
        let c = Cluster::start(Durability::Fast)
            .unwrap_or_else(|e| panic!("cannot start a PostgreSQL cluster for the tests: {e}"));
        // Statics are never dropped; stop the server when the process exits.
        unsafe { libc::atexit(stop_shared) };
        c
    })
}

/// A fresh database in the [`shared`] cluster: its URL.
pub fn fresh_database() -> String {
    shared()
        .fresh_database()
        .unwrap_or_else(|e| panic!("cannot create a test database: {e}"))
}
