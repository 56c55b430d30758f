//! `airlock-server`: the Airlock control plane.

use std::{net::SocketAddr, path::PathBuf};

use airlock_control_plane::ControlPlane;
use anyhow::{Context, Result};
use clap::Parser;

/// The Airlock control plane: receives the actions agents hold, lets approvers decide them
/// (gRPC ApprovalService, `airlockctl`), and sends the decisions back to the agents.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Address for gRPC (agents, approvals, health, reflection). Use 0.0.0.0 to accept agents
    /// from other hosts.
    #[arg(long, env = "AIRLOCK_GRPC_ADDR", default_value = "127.0.0.1:7443")]
    grpc: SocketAddr,
    /// Directory for the database (airlock.db, SQLite in WAL mode) and the audit checkpoint.
    /// Default: /var/lib/airlock when writable, else ~/.local/share/airlock.
    #[arg(long, env = "AIRLOCK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    let data_dir = match cli.data_dir {
        Some(d) => d,
        None => default_data_dir(),
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let db = data_dir.join("airlock.db");
    let store = airlock_control_plane::store::Store::open(&db)?;
    let listener = tokio::net::TcpListener::bind(cli.grpc)
        .await
        .with_context(|| format!("listening on {}", cli.grpc))?;
    println!("airlock-server: gRPC on http://{}", listener.local_addr()?);
    println!("airlock-server: data in {}", db.display());
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    ControlPlane::new(store).serve(listener, shutdown).await
}

fn default_data_dir() -> PathBuf {
    let system = PathBuf::from("/var/lib/airlock");
    if std::fs::create_dir_all(&system).is_ok() {
        return system;
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".local/share/airlock"))
        .unwrap_or_else(|| PathBuf::from("airlock-data"))
}
