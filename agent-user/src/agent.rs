//! Start-up and the agent's main loop: resolve the watch list, load the kernel side, recover
//! holds left by an earlier agent, consume hold events, keep the heartbeat, reload on SIGHUP and
//! resolve every hold on SIGTERM.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use agent_common::HoldEvent;
use airlock_proto::v1::Hello;
use anyhow::{bail, Context, Result};
use nix::unistd::{Group, User};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use crate::{
    bpf::{self, Kernel},
    config::{Config, WatchSection},
    decider::Decider,
    holds::Engine,
    policy::Policy,
    server_rules,
};

/// Resolved watch list.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Watch {
    /// uids.
    pub uids: Vec<u32>,
    /// gids.
    pub gids: Vec<u32>,
    /// cgroup ids (inode numbers of cgroup v2 directories).
    pub cgroups: Vec<u64>,
}

/// Resolves account, group, cgroup and unit names. Unknown accounts are errors; a cgroup or
/// unit that does not exist (yet) is a warning, since units come and go.
pub fn resolve_watch(w: &WatchSection, cgroup_root: &Path) -> Result<Watch> {
    let mut out = Watch::default();
    for u in &w.users {
        let uid = match u.parse::<u32>() {
            Ok(n) => n,
            Err(_) => User::from_name(u)
                .with_context(|| format!("looking up account {u:?}"))?
                .with_context(|| {
                    format!("watch.users: there is no account named {u:?} on this host")
                })?
                .uid
                .as_raw(),
        };
        out.uids.push(uid);
    }
    for g in &w.groups {
        let gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => Group::from_name(g)
                .with_context(|| format!("looking up group {g:?}"))?
                .with_context(|| {
                    format!("watch.groups: there is no group named {g:?} on this host")
                })?
                .gid
                .as_raw(),
        };
        out.gids.push(gid);
    }
    let dirs = w
        .cgroups
        .iter()
        .map(|c| {
            let p = Path::new(c.trim_start_matches('/'));
            if Path::new(c).starts_with(cgroup_root) {
                PathBuf::from(c)
            } else {
                cgroup_root.join(p)
            }
        })
        .chain(
            w.units
                .iter()
                .map(|u| cgroup_root.join("system.slice").join(u)),
        );
    for dir in dirs {
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => out.cgroups.push(m.ino()),
            Ok(_) => bail!("watch: {} is not a cgroup directory", dir.display()),
            Err(e) => {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cgroup not found (unit not running?); not watched until reload")
            }
        }
    }
    Ok(out)
}

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

/// Loads everything `config` names into the kernel and the engine.
/// `server` are the rules from the control plane, enforced after the local ones.
fn apply_config(
    engine: &Engine,
    config: &Config,
    server: &[crate::config::RuleConfig],
    path: &Path,
) -> Result<()> {
    let watch = resolve_watch(&config.watch, Path::new("/sys/fs/cgroup"))?;
    let rules = server_rules::merge(&config.rules, server).map_err(anyhow::Error::msg)?;
    let policy = Policy::compile(&rules, path)?;
    let tables = policy.kernel_tables();
    engine
        .kernel
        .set_watch(&watch.uids, &watch.gids, &watch.cgroups)?;
    engine
        .kernel
        .set_tables(&tables, config.agent.hold_all_execs)?;
    *engine.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    *engine.settings.write().unwrap_or_else(|p| p.into_inner()) = config.agent.clone();
    tracing::info!(
        uids = ?watch.uids, gids = ?watch.gids, cgroups = ?watch.cgroups,
        local_rules = config.rules.len(), server_rules = server.len(), binaries = tables.exec_files.len(), networks = tables.nets.len(),
        "policy loaded"
    );
    Ok(())
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
    let kernel = Arc::new(
        Kernel::load(&settings.bpffs_dir, Path::new("/sys/kernel/btf/vmlinux"))
            .context("loading the kernel programs")?,
    );
    let me = std::process::id();
    let hb_timeout = Duration::from_secs(settings.heartbeat_timeout_secs.max(1)).as_nanos() as u64;
    kernel.heartbeat(me, hb_timeout)?;
    let decider = settings.decider.clone().map(|url| {
        Decider::spawn_with(
            crate::decider::Connection {
                url,
                token: token.clone(),
                tls: tls.clone(),
            },
            hello.clone(),
        )
    });
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
    kernel.heartbeat(me, hb_timeout)?;

    // Holds an earlier agent left behind (it was killed mid-hold): resolve them now.
    let leftover = kernel.held();
    if !leftover.is_empty() {
        tracing::warn!(
            count = leftover.len(),
            "resuming holds left by a previous agent"
        );
    }
    for ev in leftover {
        tokio::spawn(engine.clone().handle(ev));
    }
    let sweeper = tokio::spawn(sweep(engine.clone()));

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
    tracing::info!(pid = me, "airlock-agent running");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                match Config::load(&config_path) {
                    Ok(c) => match apply_config(&engine, &c, &lock(&server), &config_path) {
                        Ok(()) => {
                            *lock(&current) = c;
                            tracing::info!(config = %config_path.display(), "reloaded");
                        }
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "reload refused; keeping the running policy"),
                    },
                    Err(e) => tracing::error!(error = %e, "reload refused; keeping the running policy"),
                }
            }
        }
    }
    tracing::info!("shutting down: resolving every hold");
    event_task.abort();
    heartbeat.abort();
    sweeper.abort();
    for t in [rules_task, metrics_task].into_iter().flatten() {
        t.abort();
    }
    engine.resolve_all("shutdown");
    let counters: BTreeMap<_, _> = bpf::named_counters(&kernel.counters())
        .into_iter()
        .collect();
    tracing::info!(?counters, "kernel counters");
    kernel.unpin_all();
    // Give queued outcomes a moment to reach the decider.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
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
        match apply_config(&engine, &config, &rules, &config_path) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_numbers() {
        let w = WatchSection {
            users: vec!["root".into(), "1234".into()],
            groups: vec!["root".into()],
            cgroups: vec![],
            units: vec![],
        };
        let r = resolve_watch(&w, Path::new("/sys/fs/cgroup")).unwrap();
        assert_eq!(r.uids, vec![0, 1234]);
        assert_eq!(r.gids, vec![0]);
    }

    #[test]
    fn unknown_account_is_a_clear_error() {
        let w = WatchSection {
            users: vec!["no-such-account-airlock".into()],
            ..Default::default()
        };
        let err = format!(
            "{:#}",
            resolve_watch(&w, Path::new("/sys/fs/cgroup")).unwrap_err()
        );
        assert!(
            err.contains("no account named \"no-such-account-airlock\""),
            "{err}"
        );
    }

    #[test]
    fn cgroup_dir_resolves_to_its_inode() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("app.slice")).unwrap();
        let w = WatchSection {
            cgroups: vec!["app.slice".into()],
            ..Default::default()
        };
        let r = resolve_watch(&w, dir.path()).unwrap();
        let ino = std::fs::metadata(dir.path().join("app.slice"))
            .unwrap()
            .ino();
        assert_eq!(r.cgroups, vec![ino]);
    }
}
