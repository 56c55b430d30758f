//! `airlock-server`: the Airlock control plane.

use std::{net::SocketAddr, path::PathBuf};

use std::sync::Arc;

use airlock_control_plane::{
    auth::{accounts, enroll, random_hex, Scope},
    config::{read_secret, ServerConfig},
    notify,
    store::{Database, Store, StoreError},
    web::{OidcLogin, Settings, Web},
    ControlPlane,
};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// Faster than the system's for the many small allocations of every request and vote.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Airlock control plane: receives the actions agents hold, lets approvers decide them
/// (gRPC ApprovalService, `airlockctl`), and sends the decisions back to the agents.
#[derive(Debug, Parser)]
#[command(name = "airlock-server", version)]
struct Cli {
    /// Address for gRPC (agents, approvals, health, reflection). Use 0.0.0.0 to accept agents
    /// from other hosts.
    #[arg(long, env = "AIRLOCK_GRPC_ADDR", default_value = "127.0.0.1:7443")]
    grpc: SocketAddr,
    /// Address for HTTP: the web UI, /healthz, /readyz, Prometheus /metrics and Slack's
    /// /slack/interactions.
    #[arg(long, env = "AIRLOCK_HTTP_ADDR", default_value = "127.0.0.1:7080")]
    http: SocketAddr,
    /// Directory for the default database (airlock.db, SQLite in WAL mode, and its audit
    /// checkpoint), policy.toml and server.toml. Default: /var/lib/airlock when writable, else
    /// ~/.local/share/airlock.
    #[arg(long, env = "AIRLOCK_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// The database: sqlite:///path/airlock.db, or postgres://user:password@host:5432/db
    /// (TLS with ?sslmode=verify-full&sslrootcert=/path/ca.pem) for several replicas sharing
    /// one database. Default: airlock.db in the data directory. Migrations run at start.
    #[arg(
        long,
        env = "AIRLOCK_DATABASE_URL",
        global = true,
        value_name = "URL",
        hide_env_values = true
    )]
    database: Option<String>,
    /// Approval policy (TOML: [groups] and [[rule]] with groups, quorum, require_reason).
    /// Default: policy.toml in the data directory if it exists, else any one approver decides.
    /// Reloaded when the file changes and on SIGHUP; a bad new policy is refused and the
    /// running one kept.
    #[arg(long, env = "AIRLOCK_POLICY")]
    policy: Option<PathBuf>,
    /// TLS certificate chain (PEM) for the gRPC listener; with --tls-key, serve https only.
    #[arg(long, requires = "tls_key", env = "AIRLOCK_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert", env = "AIRLOCK_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that signs agent client certificates: agents must then use mTLS.
    #[arg(long, requires = "tls_cert", env = "AIRLOCK_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Server configuration (TOML): [web] public_url, [oidc], [slack], [teams], [[webhook]].
    /// Default: server.toml in the data directory if it exists. Secrets are read from the
    /// files it names, never from the file itself.
    #[arg(long, env = "AIRLOCK_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Manage API tokens and agent credentials in the database (works while the server runs).
    #[command(subcommand)]
    Tokens(Tokens),
    /// Manage local web UI accounts (works while the server runs).
    #[command(subcommand)]
    Users(Users),
    /// Write man pages and bash/zsh/fish completions under DIR (packaging).
    #[command(hide = true)]
    WriteDocs {
        /// Output directory.
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum Users {
    /// Create an account; the password is read from standard input (one line), or generated
    /// and printed when --generate-password is given.
    Add {
        /// Login name, also the approver identity the policy's [groups] use.
        name: String,
        /// Approver groups, comma-separated (in addition to the policy's [groups]).
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Generate a random password and print it.
        #[arg(long)]
        generate_password: bool,
    },
    /// Set a new password (read from standard input); ends the account's sessions.
    Passwd {
        /// Login name.
        name: String,
    },
    /// Delete an account and end its sessions.
    Remove {
        /// Login name.
        name: String,
    },
    /// List accounts and their groups.
    List,
}

fn read_password() -> Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let p = line.trim_end_matches(['\r', '\n']).to_owned();
    if p.is_empty() {
        anyhow::bail!("no password on standard input (or use --generate-password)");
    }
    Ok(p)
}

async fn users(store: &Store, cmd: Users) -> Result<()> {
    match cmd {
        Users::Add {
            name,
            groups,
            generate_password,
        } => {
            let password = if generate_password {
                random_hex(12)?
            } else {
                read_password()?
            };
            accounts::create(store, &name, &password, &groups).await?;
            if generate_password {
                println!("{name} {password}");
            } else {
                println!("created {name}");
            }
        }
        Users::Passwd { name } => {
            accounts::set_password(store, &name, &read_password()?).await?;
            println!("password changed for {name}; their sessions ended");
        }
        Users::Remove { name } => {
            accounts::remove(store, &name).await?;
            println!("removed {name}");
        }
        Users::List => {
            for a in accounts::list(store).await? {
                println!("{}\t{}", a.name, a.groups.join(","));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum Tokens {
    /// Create a token and print it (it is stored hashed and cannot be shown again).
    ///
    /// To enrol an agent without copying its credential by hand: `--scope enroll` prints a
    /// one-time enrollment token; put it in the host's agent.enroll_token_file and the agent
    /// trades it for its own credential at start. It works once, expires (--ttl-hours), and
    /// with --host only enrols that host. Without --host it enrols any host that has no
    /// credential yet; replacing a host's credential needs a token made with --host.
    Create {
        /// Identity: the approver's name, or for scope agent the agent's host id (its
        /// /etc/machine-id unless agent.host_id is set). For scope enroll, a label for the
        /// audit trail (it does not bind the token to a host; --host does).
        #[arg(long)]
        name: String,
        /// agent (an agent's credential), read, approve, admin, or enroll (a one-time
        /// enrollment token for an agent).
        #[arg(long)]
        scope: Scope,
        /// Scope enroll only: hours until the token expires (default 24, at most 720).
        #[arg(long, value_name = "HOURS", value_parser = clap::value_parser!(u64).range(1..=720))]
        ttl_hours: Option<u64>,
        /// Scope enroll only: the host id (the agent's /etc/machine-id unless agent.host_id is
        /// set) the token may enrol; an agent with another host id is refused.
        #[arg(long, value_name = "HOST_ID")]
        host: Option<String>,
    },
    /// Revoke a token by name.
    Revoke {
        /// The token's name.
        name: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::WriteDocs { dir }) = &cli.command {
        use clap::CommandFactory;
        airlock_cli_docs::write(Cli::command(), dir)?;
        return Ok(());
    }
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
    // Parsed here rather than by clap, whose error would repeat the value, password and all.
    let db = match cli.database.as_deref().map(str::parse::<Database>) {
        Some(Ok(db)) => db,
        Some(Err(e)) => {
            use clap::CommandFactory;
            Cli::command()
                .error(clap::error::ErrorKind::InvalidValue, e)
                .exit()
        }
        None => Database::sqlite(data_dir.join("airlock.db")),
    };
    let store = Store::open(&db)
        .await
        .with_context(|| format!("opening the database {db}"))?;
    match cli.command {
        Some(Cmd::Tokens(Tokens::Create {
            name,
            scope,
            ttl_hours,
            host,
        })) => {
            if scope == Scope::Enroll {
                let ttl = ttl_hours.map_or(enroll::DEFAULT_TTL, |h| {
                    std::time::Duration::from_secs(h * 3600)
                });
                let created = enroll::create(&store, &name, host.as_deref(), ttl, "server").await?;
                // The token alone on stdout, for scripts; what it is for on stderr.
                eprintln!(
                    "airlock-server: one-time enrollment token {:?} for {}, expires in {} h",
                    created.id,
                    host.as_deref()
                        .map_or("any host not enrolled yet".to_owned(), |h| {
                            format!("host {h:?}")
                        }),
                    ttl.as_secs() / 3600
                );
                println!("{}", created.token);
                return Ok(());
            }
            if ttl_hours.is_some() || host.is_some() {
                anyhow::bail!(
                    "--ttl-hours and --host are for --scope enroll only; other tokens last until \
                     revoked (`airlock-server tokens revoke NAME`)"
                );
            }
            println!("{}", store.create_token(&name, scope).await?);
            return Ok(());
        }
        Some(Cmd::Tokens(Tokens::Revoke { name })) => {
            if !store.revoke_token(&name).await? {
                anyhow::bail!("no active token named {name:?}");
            }
            println!("revoked {name}");
            return Ok(());
        }
        Some(Cmd::Users(cmd)) => return users(&store, cmd).await,
        Some(Cmd::WriteDocs { .. }) | None => {}
    }
    raise_open_files();
    // Replicas starting together on a new database: one of them makes the first login and
    // token, the others find them taken.
    if !accounts::any(&store).await? {
        let password = random_hex(12)?;
        match accounts::create(&store, "admin", &password, &["admins".into()]).await {
            Ok(_) => println!(
                "airlock-server: first start; web UI login (shown once): admin / {password}"
            ),
            Err(accounts::AccountError::Exists(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !store.has_admin_token().await? {
        match store.create_token("admin", Scope::Admin).await {
            Ok(token) => println!(
                "airlock-server: first start; admin token (shown once, keep it safe): {token}"
            ),
            Err(StoreError::TokenExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let listener = tokio::net::TcpListener::bind(cli.grpc)
        .await
        .with_context(|| format!("listening on {}", cli.grpc))?;
    let scheme = if cli.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    println!(
        "airlock-server: gRPC on {scheme}://{}",
        listener.local_addr()?
    );
    println!("airlock-server: database {db}");
    let config_path = cli
        .config
        .clone()
        .or_else(|| Some(data_dir.join("server.toml")).filter(|p| p.exists()));
    let config = match &config_path {
        Some(p) => ServerConfig::load(p)?,
        None => ServerConfig::default(),
    };
    let mut plane = ControlPlane::new(store);
    plane.limits = config.limits.clone();
    plane.connections = config.connections.clone();
    if let Some(key_file) = &config.audit.checkpoint_key_file {
        let secret = airlock_control_plane::config::read_secret(key_file)?;
        let signer = airlock_control_plane::checkpoint::Signer::from_hex(secret.expose())
            .with_context(|| format!("audit.checkpoint_key_file {key_file}"))?;
        println!(
            "airlock-server: audit checkpoints signed with public key {} (give it to airlockctl audit verify --public-key)",
            signer.public_hex()
        );
        let (p, every, file) = (
            plane.clone(),
            std::time::Duration::from_secs(config.audit.checkpoint_every_secs),
            config.audit.checkpoint_file.clone().map(PathBuf::from),
        );
        tokio::spawn(async move {
            p.sign_checkpoints(std::sync::Arc::new(signer), every, file)
                .await
        });
    }
    if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        plane.tls = Some(airlock_control_plane::Tls {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: cli.tls_client_ca.as_ref().map(read).transpose()?,
        });
    }
    let policy_path = cli
        .policy
        .clone()
        .or_else(|| Some(data_dir.join("policy.toml")).filter(|p| p.exists()));
    plane.start_policy(policy_path.as_deref()).await?;
    if let Some(path) = &policy_path {
        println!("airlock-server: policy {}", path.display());
        let (plane, path) = (plane.clone(), path.clone());
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            // Reload on SIGHUP, and when the file changes (checked every two seconds).
            let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut seen = modified(&path);
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
            loop {
                tokio::select! {
                    _ = hup.recv() => {}
                    _ = tick.tick() => {
                        let now = modified(&path);
                        if now == seen {
                            continue;
                        }
                        seen = now;
                    }
                }
                match plane.load_policy(&path).await {
                    Ok(()) => tracing::info!(policy = %path.display(), "policy reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "new policy refused; the running one stays")
                    }
                }
            }
        });
    }
    let http = tokio::net::TcpListener::bind(cli.http)
        .await
        .with_context(|| format!("listening on {}", cli.http))?;
    let http_addr = http.local_addr()?;
    let public_url = match &config.web.public_url {
        Some(u) => url::Url::parse(u).with_context(|| format!("web.public_url {u:?}"))?,
        None => url::Url::parse(&format!("http://{http_addr}"))?,
    };
    if let Some(u) = &config.web.public_url {
        plane.agents.set_web_url(u);
    }
    let settings = Settings::new(public_url.clone(), &config.web);
    if !settings.secure_cookies && !http_addr.ip().is_loopback() {
        tracing::warn!(
            "the web UI is served over plain http on a non-loopback address: put TLS in front \
             of it and set web.public_url to its https address"
        );
    }
    let oidc = match &config.oidc {
        Some(o) => {
            let secret = o
                .client_secret_file
                .as_deref()
                .map(read_secret)
                .transpose()?;
            Some(Arc::new(
                OidcLogin::new(o.clone(), secret, &settings).context("oidc redirect URL")?,
            ))
        }
        None => None,
    };
    let web = Web::new(plane.clone(), settings, oidc);
    let mut routes = web.router();
    let channels = notify::channels_from_config(&config, &public_url)?;
    // Kept alive until the server stops: dropping the hub stops the channel workers.
    let _hub = notify::Hub::start(plane.store.clone(), &channels, plane.metrics.clone())
        .await
        .context("starting the notification channels")?;
    if let Some(app) = channels.slack.clone() {
        routes = routes.merge(notify::slack::router(app, plane.decisions()));
        println!("airlock-server: Slack buttons on {public_url}slack/interactions");
    }
    println!("airlock-server: web UI on {public_url}");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let http_plane = plane.clone();
    let http_stop = stopped(stop_rx.clone());
    let http_task =
        tokio::spawn(async move { http_plane.serve_http(http, routes, http_stop).await });
    let cap = stopped(stop_rx.clone());
    let result = tokio::select! {
        r = plane.serve(listener, stopped(stop_rx)) => r,
        // A client that never hangs up must not keep a stopping server alive.
        _ = async { cap.await; tokio::time::sleep(std::time::Duration::from_secs(10)).await } => {
            tracing::warn!("gRPC connections still open 10 s after the stop; closing them");
            Ok(())
        }
    };
    // Live event streams of open browser tabs do not end by themselves: give requests in
    // flight a moment, then stop.
    if tokio::time::timeout(std::time::Duration::from_secs(3), http_task)
        .await
        .is_err()
    {
        tracing::info!("closed the web UI's open event streams");
    }
    result
}

/// Many agents means many connections: use every file descriptor the hard limit allows.
fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
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
