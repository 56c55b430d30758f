//! A real `airlock-server` process for tests: started on ephemeral ports, read until it says
//! where it serves, its log kept, killed when dropped.
//!
//! Use from a test crate with `#[path = "support/server.rs"] mod server;`.
#![allow(dead_code)] // each test crate uses a part

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

/// A running `airlock-server`, killed when dropped.
pub struct Server {
    /// The process.
    pub child: Child,
    /// What it printed on standard output, up to and including the web UI's address.
    pub printed: String,
    /// Its log (standard error) so far.
    pub log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts the server on `data` with `args` and ephemeral ports; returns once it says where
    /// its web UI is, which it does after every first-start step. Panics, with what it printed
    /// and logged, if it stops before that.
    pub fn start(data: &Path, database: &str, args: &[&OsStr]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_airlock-server"))
            .env("AIRLOCK_DATABASE_URL", database)
            .args([
                "--grpc",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut printed = String::new();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) => {
                    printed.push_str(&line);
                    printed.push('\n');
                    if line.contains("web UI on ") {
                        break;
                    }
                }
                _ => {
                    let status = child.wait().unwrap();
                    std::thread::sleep(Duration::from_millis(200)); // the rest of its log
                    panic!(
                        "airlock-server stopped ({status}) before serving; printed:\n{printed}\
                         log:\n{}",
                        log.lock().unwrap()
                    );
                }
            }
        }
        // Keep reading standard output, so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server {
            child,
            printed,
            log,
        }
    }

    /// The first word of the printed text that starts with `prefix`.
    pub fn printed_word(&self, prefix: &str) -> Option<String> {
        self.printed
            .split_whitespace()
            .find(|w| w.starts_with(prefix))
            .map(str::to_owned)
    }

    /// The gRPC address (`http://127.0.0.1:PORT`).
    pub fn grpc_url(&self) -> String {
        let text = &self.printed;
        let (_, rest) = text
            .split_once("gRPC on ")
            .unwrap_or_else(|| panic!("no gRPC address in {text}"));
        rest.split_whitespace().next().unwrap().to_owned()
    }

    /// Ends the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The web UI's base URL (`http://127.0.0.1:PORT/`).
    pub fn http_url(&self) -> String {
        let text = &self.printed;
        let (_, rest) = text
            .split_once("web UI on ")
            .unwrap_or_else(|| panic!("no web UI address in {text}"));
        rest.split_whitespace().next().unwrap().to_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
