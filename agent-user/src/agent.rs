//! Start-up and the agent's main loop: resolve the watch list, load the kernel side, recover
//! holds left by an earlier agent, consume hold events, keep the heartbeat, reload on SIGHUP and
//! when a rule's binary or a watched cgroup changes, and stop on SIGTERM leaving every hold and
//! mark with the kernel for the next agent (an upgrade or restart loses nothing). Only
//! [`uninstall`] denies what is held and unloads the programs.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use agent_common::HoldEvent;
use airlock_proto::v1::Hello;
use anyhow::{bail, Context, Result};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use crate::{
    bpf::{self, Kernel},
    config::Config,
    decider::Decider,
    holds::Engine,
    policy::Policy,
    server_rules,
    watch::{self, PathWatch},
};

/// Where cgroup v2 is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How often the loaded paths are checked even without an inotify event (a backstop).
const RESCAN_INTERVAL: Duration = Duration::from_secs(2);

/// The host identity: configured, else /etc/machine-id, else the hostname.
pub fn host_id(configured: Option<&str>) -> String {
    if let Some(id) = configured {
        return id.to_owned();
    }
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(hostname)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// TLS settings for an https decider, from agent.tls_* files.
pub fn client_tls(
    settings: &crate::config::AgentSection,
) -> Result<Option<tonic::transport::ClientTlsConfig>> {
    let read = |p: &std::path::PathBuf| {
        std::fs::read(p).with_context(|| format!("reading {}", p.display()))
    };
    let Some(ca) = &settings.tls_ca_file else {
        if settings.tls_cert_file.is_some() {
            bail!("agent.tls_cert_file needs agent.tls_ca_file too");
        }
        return Ok(None);
    };
    let mut cfg = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
    match (&settings.tls_cert_file, &settings.tls_key_file) {
        (Some(cert), Some(key)) => {
            cfg = cfg.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        (None, None) => {}
        _ => bail!("agent.tls_cert_file and agent.tls_key_file go together"),
    }
    Ok(Some(cfg))
}

/// The agent's credential: AIRLOCK_AGENT_TOKEN, else the contents of agent.token_file.
fn agent_token(settings: &crate::config::AgentSection) -> Result<Option<String>> {
    if let Ok(t) = std::env::var("AIRLOCK_AGENT_TOKEN") {
        return Ok(Some(t.trim().to_owned()));
    }
    match &settings.token_file {
        Some(path) => {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("reading agent.token_file {}", path.display()))?;
            Ok(Some(t.trim().to_owned()))
        }
        None => Ok(None),
    }
}

/// What a loaded configuration depends on in the file system: the identity of every rule
/// binary and the watched cgroup ids. When it changes, the tables are loaded again.
#[derive(Debug, PartialEq, Eq)]
struct Loaded {
    binaries: Vec<(String, Option<agent_common::FileKey>)>,
    cgroups: Vec<u64>,
}

impl Loaded {
    fn of(config: &Config, server: &[crate::config::RuleConfig]) -> Self {
        let mut binaries: Vec<_> = config
            .rules
            .iter()
            .chain(server)
            .flat_map(|r| r.exec.iter())
            .filter(|e| e.starts_with('/'))
            .map(|e| (e.clone(), crate::identity::file_key(Path::new(e)).ok()))
            .collect();
        binaries.sort_by(|a, b| a.0.cmp(&b.0));
        binaries.dedup();
        let cgroups = watch::resolve(&config.watch, Path::new(CGROUP_ROOT))
            .map(|w| w.cgroups)
            .unwrap_or_default();
        Self { binaries, cgroups }
    }

    /// The paths whose parent directories are watched for changes (a binary renamed over, a
    /// cgroup made again).
    fn paths(&self, config: &Config) -> Vec<PathBuf> {
        self.binaries
            .iter()
            .map(|(p, _)| PathBuf::from(p))
            .chain(watch::cgroup_dirs(&config.watch, Path::new(CGROUP_ROOT)))
            .collect()
    }
}

/// Loads everything `config` names into the kernel and the engine.
/// `server` are the rules from the control plane, enforced after the local ones.
fn apply_config(
    engine: &Engine,
    config: &Config,
    server: &[crate::config::RuleConfig],
    path: &Path,
) -> Result<()> {
    let watch = watch::resolve(&config.watch, Path::new(CGROUP_ROOT))?;
    let rules = server_rules::merge(&config.rules, server).map_err(anyhow::Error::msg)?;
    // Host names in `connect` stand for the addresses they resolve to now; new names are
    // looked up at once, and the rules applied again when their addresses change.
    engine.names.set_names(Policy::names_in(&rules));
    let policy = Policy::compile_resolved(&rules, path, &engine.names.resolved())?;
    let tables = policy.kernel_tables();
    let hold_self_made = config.agent.copy_detection && policy.names_binaries();
    engine.kernel.set_watch(
        &watch.uids,
        &watch.gids,
        &watch.cgroups,
        &watch.cgroup_paths,
    )?;
    engine
        .kernel
        .set_tables(&tables, config.agent.hold_all_execs, hold_self_made)?;
    engine.kernel.prune_cgroups(&watch.cgroups);
    *engine.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    *engine.settings.write().unwrap_or_else(|p| p.into_inner()) = config.agent.clone();
    tracing::info!(
        uids = ?watch.uids, gids = ?watch.gids, cgroups = ?watch.cgroups,
        local_rules = config.rules.len(), server_rules = server.len(), binaries = tables.exec_files.len(), networks = tables.nets.len(),
        "policy loaded"
    );
    Ok(())
}

/// Applies a configuration off the async workers (loading large tables takes a while, and holds
/// and signals must not wait for it), one at a time.
async fn apply_in_background(
    engine: Arc<Engine>,
    config: Config,
    server: Vec<crate::config::RuleConfig>,
    path: PathBuf,
) -> Result<()> {
    static APPLYING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one_at_a_time = APPLYING.lock().await;
    tokio::task::spawn_blocking(move || apply_config(&engine, &config, &server, &path))
        .await
        .context("the reload task failed")?
}

/// Loads the kernel side as `config` says (reusing what an earlier agent pinned).
fn load_kernel(config: &Config) -> Result<Arc<Kernel>> {
    Ok(Arc::new(
        Kernel::load(
            &config.agent.bpffs_dir,
            Path::new("/sys/kernel/btf/vmlinux"),
            config.agent.max_watched_tasks,
        )
        .context("loading the kernel programs")?,
    ))
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config, config_path: PathBuf) -> Result<()> {
    bpf::preflight::check(Path::new("/sys"))?;
    let settings = config.agent.clone();
    let host = host_id(settings.host_id.as_deref());
    let tls = client_tls(&settings)?;
    let hello = Hello {
        host_id: host.clone(),
        hostname: hostname(),
        labels: settings.labels.clone().into_iter().collect(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    // Before the kernel programs are loaded: an agent that cannot get a credential cannot run,
    // and should say so before touching anything. AIRLOCK_AGENT_TOKEN is a credential too.
    if let (Some(url), None) = (&settings.decider, std::env::var_os("AIRLOCK_AGENT_TOKEN")) {
        let conn = crate::decider::Connection {
            url: url.clone(),
            token: None,
            tls: tls.clone(),
        };
        crate::enroll::ensure_credential(&settings, &conn, &hello).await?;
    }
    let token = agent_token(&settings)?;
    let kernel = load_kernel(&config)?;
    let me = std::process::id();
    let hb_timeout = Duration::from_secs(settings.heartbeat_timeout_secs.max(1)).as_nanos() as u64;
    kernel.heartbeat(me, hb_timeout)?;
    let connection = settings
        .decider
        .clone()
        .map(|url| crate::decider::Connection {
            url,
            token: token.clone(),
            tls: tls.clone(),
        });
    let decider = connection
        .clone()
        .map(|conn| Decider::spawn_with(conn, hello.clone()));
    let engine = Arc::new(Engine::new(
        kernel.clone(),
        Policy::default(),
        decider,
        settings,
        host,
    ));
    let server = Arc::new(std::sync::Mutex::new(server_rules::load_cache(
        &config.agent.rules_cache,
    )));
    let current = Arc::new(std::sync::Mutex::new(config.clone()));
    let loaded = Loaded::of(&config, &lock(&server));
    apply_config(&engine, &config, &lock(&server), &config_path)?;
    let rules_task = engine.decider.as_ref().map(|d| {
        tokio::spawn(follow_rules(
            d.rules(),
            engine.clone(),
            current.clone(),
            server.clone(),
            config_path.clone(),
        ))
    });
    let paths_task = tokio::spawn(follow_paths(
        engine.clone(),
        current.clone(),
        server.clone(),
        config_path.clone(),
        loaded,
    ));
    kernel.heartbeat(me, hb_timeout)?;

    // Holds an earlier agent left behind (stopped, restarted or upgraded mid-hold).
    let leftover = kernel.held();
    if !leftover.is_empty() {
        tracing::warn!(
            count = leftover.len(),
            "taking over holds left by a previous agent"
        );
    }
    for ev in leftover {
        tokio::spawn(engine.clone().handle(ev));
    }
    let sweeper = tokio::spawn(sweep(engine.clone()));
    let dns_task = tokio::spawn(engine.names.clone().run(engine.metrics.clone()));
    let dns_follow = tokio::spawn(follow_names(
        engine.clone(),
        current.clone(),
        server.clone(),
        config_path.clone(),
    ));

    let events = kernel.take_events().context("ring buffer already taken")?;
    // SAFETY: the ring buffer owns its map fd, which stays open as long as the AsyncFd.
    let events = unsafe { AsyncFd::register(events) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer: {e}"))?;
    let event_task = tokio::spawn(consume(events, engine.clone()));
    let hb_kernel = kernel.clone();
    let heartbeat = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            if let Err(e) = hb_kernel.heartbeat(me, hb_timeout) {
                tracing::error!(error = %e, "heartbeat failed");
            }
        }
    });
    let metrics_task = match config.agent.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for metrics on {addr}"))?;
            let app = crate::metrics::router(kernel.clone(), engine.metrics.clone());
            tracing::info!(%addr, "metrics on http://{addr}/metrics");
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "metrics endpoint failed");
                }
            }))
        }
        None => None,
    };
    let local_task = (!config.agent.local_socket.as_os_str().is_empty()).then(|| {
        let api = Arc::new(crate::local_api::LocalApi {
            engine: engine.clone(),
            config: current.clone(),
            server_rules: server.clone(),
            config_path: config_path.clone(),
            connection,
            asked: Default::default(),
            open: Default::default(),
        });
        let path = config.agent.local_socket.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::local_api::serve(api, &path).await {
                tracing::error!(socket = %path.display(), error = %format!("{e:#}"), "the local socket for AI agents failed");
            }
        })
    });
    tracing::info!(pid = me, "airlock-agent running");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let (engine, current, server, path) = (engine.clone(), current.clone(), server.clone(), config_path.clone());
                tokio::spawn(async move {
                    let c = match Config::load(&path) {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::error!(error = %e, "reload refused; keeping the running policy");
                            return;
                        }
                    };
                    let rules = lock(&server).clone();
                    match apply_in_background(engine, c.clone(), rules, path.clone()).await {
                        Ok(()) => {
                            *lock(&current) = c;
                            tracing::info!(config = %path.display(), "reloaded");
                        }
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "reload refused; keeping the running policy"),
                    }
                });
            }
        }
    }
    event_task.abort();
    heartbeat.abort();
    sweeper.abort();
    dns_task.abort();
    dns_follow.abort();
    paths_task.abort();
    for t in [rules_task, metrics_task, local_task].into_iter().flatten() {
        t.abort();
    }
    if let Err(e) = kernel.retire() {
        tracing::error!(error = %e, "could not retire as the agent; the kernel stops trusting this pid when its heartbeat goes stale");
    }
    let held = kernel.held().len();
    let counters: BTreeMap<_, _> = bpf::named_counters(&kernel.counters())
        .into_iter()
        .collect();
    tracing::info!(?counters, "kernel counters");
    tracing::info!(
        held,
        "stopping; holds and marks stay with the kernel for the next agent (watched actions fail closed until it runs; `airlock-agent --uninstall` releases and unloads)"
    );
    // Give queued outcomes a moment to reach the decider.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Denies whatever is held, then detaches the programs and removes every pin: what removing
/// the agent from a host does. Run it with the agent stopped. Where the programs can no longer
/// be loaded, the pins are removed without them ([`bpf::uninstall_pinned`]).
pub async fn uninstall(config: Config) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(bpf::preflight::PreflightError::NotPrivileged.into());
    }
    let dir = &config.agent.bpffs_dir;
    if !dir.exists() {
        println!(
            "airlock-agent: nothing to uninstall ({} does not exist)",
            dir.display()
        );
        return Ok(());
    }
    // Without the programs, only the pins can be cleared, and only by killing what is held:
    // that is for a host whose programs cannot load (lockdown, or a load the kernel refuses),
    // never for a misconfigured agent (in a PID namespace, its pids would name other
    // processes).
    let loaded = match bpf::preflight::check(Path::new("/sys")) {
        Ok(()) => load_kernel(&config),
        Err(e @ bpf::preflight::PreflightError::Lockdown { .. }) => Err(e.into()),
        Err(e) => return Err(e.into()),
    };
    let kernel = match loaded {
        Ok(kernel) => kernel,
        Err(e) => {
            bpf::preflight::check_pid_namespace(
                &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
            )?;
            tracing::warn!(
                error = format!("{e:#}"),
                "the kernel programs cannot be loaded here; removing the pins without them, and \
                 killing every held task (resumed without the programs, it would run unchecked)"
            );
            let killed = bpf::uninstall_pinned(dir)?;
            println!(
                "airlock-agent: uninstalled without loading the programs ({killed} held task(s) \
                 killed; nothing left under {})",
                dir.display()
            );
            return Ok(());
        }
    };
    kernel.heartbeat(std::process::id(), Duration::from_secs(5).as_nanos() as u64)?;
    let host = host_id(config.agent.host_id.as_deref());
    let engine = Engine::new(
        kernel.clone(),
        Policy::default(),
        None,
        config.agent.clone(),
        host,
    );
    let held = kernel.held().len();
    engine.deny_all("uninstall");
    kernel.unload();
    tracing::info!(
        denied = held,
        dir = %config.agent.bpffs_dir.display(),
        "uninstalled: held tasks denied, programs detached, pins removed"
    );
    println!(
        "airlock-agent: uninstalled ({held} held task(s) denied; nothing left under {})",
        config.agent.bpffs_dir.display()
    );
    Ok(())
}

/// Reloads the tables when a rule's binary or a watched cgroup changes: a binary replaced by
/// rename (a package upgrade) has a new inode, a restarted unit a new cgroup.
async fn follow_paths(
    engine: Arc<Engine>,
    current: Arc<std::sync::Mutex<Config>>,
    server: Arc<std::sync::Mutex<Vec<crate::config::RuleConfig>>>,
    config_path: PathBuf,
    mut loaded: Loaded,
) {
    let mut watching: Option<PathWatch> = None;
    let mut watched: Vec<PathBuf> = Vec::new();
    loop {
        let config = lock(&current).clone();
        let now = Loaded::of(&config, &lock(&server));
        // Watch first, then compare: a change between the two is seen either way.
        let paths = now.paths(&config);
        if paths != watched {
            watching = PathWatch::new(paths.iter().map(PathBuf::as_path))
                .map_err(|e| tracing::warn!(error = %format!("{e:#}"), "cannot watch paths; checking every few seconds"))
                .ok();
            watched = paths;
            continue;
        }
        if now != loaded {
            let rules = lock(&server).clone();
            match apply_in_background(engine.clone(), config, rules, config_path.clone()).await {
                Ok(()) => {
                    tracing::info!("a rule binary or a watched cgroup changed; tables reloaded");
                    loaded = now;
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "reload after a change failed; keeping the running tables")
                }
            }
            continue;
        }
        let changed = async {
            match &watching {
                Some(w) => {
                    let _ = w.changed().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(RESCAN_INTERVAL) => {}
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Applies every rules update from the decider: a bad one is refused (the running rules stay),
/// a good one is cached on disk and enforced.
async fn follow_rules(
    mut updates: tokio::sync::watch::Receiver<Option<airlock_proto::v1::RulesUpdate>>,
    engine: Arc<Engine>,
    current: Arc<std::sync::Mutex<Config>>,
    server: Arc<std::sync::Mutex<Vec<crate::config::RuleConfig>>>,
    config_path: PathBuf,
) {
    while updates.changed().await.is_ok() {
        let Some(update) = updates.borrow_and_update().clone() else {
            continue;
        };
        let rules = match server_rules::parse(&update.rules_toml) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(version = %update.version, error = %e, "rules from the decider refused; keeping the running rules");
                continue;
            }
        };
        let config = lock(&current).clone();
        match apply_in_background(
            engine.clone(),
            config.clone(),
            rules.clone(),
            config_path.clone(),
        )
        .await
        {
            Ok(()) => {
                *lock(&server) = rules;
                if let Err(e) =
                    server_rules::save_cache(&config.agent.rules_cache, &update.rules_toml)
                {
                    tracing::warn!(path = %config.agent.rules_cache.display(), error = %e, "could not cache the rules");
                }
                tracing::info!(version = %update.version, "rules from the decider in force");
            }
            Err(e) => {
                tracing::error!(version = %update.version, error = %format!("{e:#}"), "rules from the decider refused; keeping the running rules")
            }
        }
    }
}

/// Applies the rules again whenever the addresses of the names in connect rules change, so
/// that the kernel's tables follow them.
async fn follow_names(
    engine: Arc<Engine>,
    current: Arc<std::sync::Mutex<Config>>,
    server: Arc<std::sync::Mutex<Vec<crate::config::RuleConfig>>>,
    config_path: PathBuf,
) {
    loop {
        engine.names.changed.notified().await;
        let config = lock(&current).clone();
        let rules = lock(&server).clone();
        if let Err(e) =
            apply_in_background(engine.clone(), config, rules, config_path.clone()).await
        {
            tracing::error!(error = %format!("{e:#}"), "applying the new addresses of the rules' names failed; the earlier ones stay");
        }
    }
}

/// Picks up holds that never arrived through this agent's ring (published into the ring of an
/// agent that has since been replaced, during its restart): every hold in the held map that is
/// older than a second and not being handled gets handled. Handling is idempotent.
async fn sweep(engine: Arc<Engine>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tick.tick().await;
        let now = bpf::monotonic_ns();
        for ev in engine.kernel.held() {
            if now.saturating_sub(ev.hold_ns) > SWEEP_INTERVAL.as_nanos() as u64 {
                tokio::spawn(engine.clone().handle(ev));
            }
        }
    }
}

/// How often the held map is swept for holds no ring event announced.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Reads hold events from the ring buffer and starts a hold handler for each.
async fn consume(mut ring: AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>, engine: Arc<Engine>) {
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "ring buffer poll failed");
                return;
            }
        };
        let rb = guard.get_inner_mut();
        while let Some(item) = rb.next() {
            if item.len() < std::mem::size_of::<HoldEvent>() {
                tracing::error!(len = item.len(), "short record in ring buffer");
                continue;
            }
            // SAFETY: the kernel writes a whole HoldEvent (repr(C), plain data) per record.
            let ev: HoldEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            tokio::spawn(engine.clone().handle(ev));
        }
        guard.clear_ready();
    }
}
