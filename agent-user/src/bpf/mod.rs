//! The kernel side as the agent sees it: loading and pinning the BPF LSM programs, filling
//! their maps, and releasing held tasks.
//!
//! Maps and links are pinned under `<bpffs dir>/v<layout>`. The programs therefore stay
//! attached when the agent stops, crashes or is upgraded: watched tasks keep being held (and
//! fail closed once the heartbeat goes stale), marks stay on their tasks, and the next agent
//! reopens the same maps and finds every task still held. Only [`Kernel::unload`] (an explicit
//! uninstall) detaches them.

pub mod offsets;
pub mod preflight;

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use agent_common::{
    maps as names, CgroupPath, Config, FileKey, FileStamp, HoldEvent, HoldKind, KernelOffsets,
    Verdict, VerdictKey, CGROUP_PATH_LEN, COUNTER_SLOTS, EXIT_PENDING, LAYOUT, OFFSETS_GLOBAL,
    VERDICT_ALLOW, VERDICT_DENY,
};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, PerCpuArray, RingBuf,
    },
    programs::{links::FdLink, links::PinnedLink, BtfTracePoint, FExit, Lsm},
    Btf, Ebpf, EbpfLoader,
};

use crate::policy::KernelTables;

/// The compiled kernel programs, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/airlock.bpf.o"));

/// LSM programs and the hooks they attach to.
const LSM_PROGRAMS: [(&str, &str); 13] = [
    ("mark_fork", "task_alloc"),
    ("unmark", "task_free"),
    ("exec_start", "bprm_creds_for_exec"),
    ("exec_level", "bprm_check_security"),
    ("exec_hold", "bprm_committed_creds"),
    ("mmap_hold", "mmap_file"),
    ("mprotect_hold", "file_mprotect"),
    ("connect_hold", "socket_connect"),
    ("send_hold", "socket_sendmsg"),
    ("sctp_connect_guard", "sctp_bind_connect"),
    ("signal_guard", "task_kill"),
    ("sigio_guard", "file_send_sigiotask"),
    ("ptrace_guard", "ptrace_access_check"),
];
/// BTF tracepoint programs and their tracepoints.
const TP_PROGRAMS: [(&str, &str); 3] = [
    ("task_exit", "sched_process_exit"),
    ("cgroup_made", "cgroup_mkdir"),
    ("cgroup_gone", "cgroup_rmdir"),
];
/// fexit programs and the kernel functions they follow.
const FEXIT_PROGRAMS: [(&str, &str); 1] = [("restop", "get_signal")];

/// How long a one-shot verdict waits for its call to come back.
const ONE_SHOT_TTL: Duration = Duration::from_secs(60);

/// Errors from the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The object could not be loaded (often: pinned maps from an incompatible older agent).
    #[error("loading the BPF object failed: {0}. If an older airlock-agent left maps pinned under {1}, run `airlock-agent --uninstall` with that agent, or remove the directory")]
    Load(#[source] Box<aya::EbpfError>, String),
    /// A program would not load or attach.
    #[error("{action} of BPF program {program} ({hook}) failed: {source}. If BPF LSM is active (see /sys/kernel/security/lsm), the kernel may forbid trampoline programs here (lockdown, or a kernel without BPF trampoline support). `airlock-agent --uninstall` denies what is held and removes every pin")]
    Program {
        /// load or attach.
        action: &'static str,
        /// Program name.
        program: &'static str,
        /// Hook or tracepoint.
        hook: &'static str,
        /// Cause.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map is missing from the object or has a different type.
    #[error("BPF map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Cause.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// A file operation on bpffs failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Kernel BTF missing or incomplete.
    #[error(transparent)]
    Offsets(#[from] offsets::OffsetError),
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> KernelError {
    move |source| KernelError::Map {
        name,
        source: Box::new(source),
    }
}

/// How a hold is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Resume the task; a held call goes through.
    Resume,
    /// Kill the task.
    Kill,
    /// Resume the task; its held call fails with EACCES.
    Refuse,
}

/// Result of releasing a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The signal was delivered.
    Done,
    /// The task had already exited (or the hold was released by someone else).
    Vanished,
}

/// Handles on the maps the agent reads and writes.
struct Maps {
    held: HashMap<MapData, u32, HoldEvent>,
    verdicts: HashMap<MapData, VerdictKey, Verdict>,
    exits: HashMap<MapData, u32, i32>,
    config: Array<MapData, Config>,
    counters: PerCpuArray<MapData, u64>,
    uids: HashMap<MapData, u32, u8>,
    gids: HashMap<MapData, u32, u8>,
    cgroups: HashMap<MapData, u64, u8>,
    cgroup_paths: HashMap<MapData, CgroupPath, u8>,
    exec_files: HashMap<MapData, FileKey, u64>,
    cleared: HashMap<MapData, FileKey, FileStamp>,
    nets: LpmTrie<MapData, [u8; 16], u64>,
    ports: HashMap<MapData, u16, u64>,
}

/// The loaded, attached programs and their maps.
pub struct Kernel {
    ebpf: Mutex<Ebpf>,
    /// `<bpffs dir>`: the layout directory and nothing else of ours lives there.
    root: PathBuf,
    maps: Mutex<Maps>,
    events: Mutex<Option<RingBuf<MapData>>>,
    config: Mutex<Config>,
    /// Keeps `kernel.bpf_stats_enabled` on while the agent runs (per-program run times).
    _stats: Option<OwnedFd>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::Map {
        name,
        source: Box::new(aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        }),
    })?;
    T::try_from(map).map_err(map_err(name))
}

/// Pins `link` at `path`, replacing (and so detaching) a link an earlier agent pinned there.
/// The new link is attached before the old one goes, so no exec slips through in between.
fn pin_replacing(link: FdLink, path: &Path) -> Result<(), KernelError> {
    if path.exists() {
        if let Ok(old) = PinnedLink::from_pin(path) {
            let _ = old.unpin();
        } else {
            let _ = fs::remove_file(path);
        }
    }
    link.pin(path).map_err(|e| KernelError::Io {
        what: "pinning link",
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(())
}

/// This process's start time as the kernel keeps it (`task_struct::start_boottime`), to within
/// a clock tick: /proc/self/stat's field 22, in ticks since boot.
fn own_start_boottime_ns() -> u64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(") ")?;
            // Field 3 is the first after the comm; start time is field 22.
            rest.split_whitespace().nth(19)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * (1_000_000_000 / hz)
}

/// Monotonic clock in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64
}

/// `BPF_FS_MAGIC` from <linux/magic.h>.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts the BPF file system at /sys/fs/bpf when `dir` is under it and it is not mounted
/// (minimal hosts and containers often lack it).
fn ensure_bpffs(dir: &Path) -> Result<(), KernelError> {
    let mount_point = Path::new("/sys/fs/bpf");
    if !dir.starts_with(mount_point) {
        return Ok(());
    }
    let mounted =
        nix::sys::statfs::statfs(mount_point).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if mounted {
        return Ok(());
    }
    tracing::info!("mounting the BPF file system at /sys/fs/bpf");
    nix::mount::mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| KernelError::Io {
        what: "mounting the BPF file system (mount -t bpf bpf /sys/fs/bpf) at",
        path: mount_point.to_owned(),
        source: e.into(),
    })
}

/// Updates a hash map from `old` to `new` so that at every moment each key's value is a
/// superset of what it was and of what it will be: first every key gets `old | new`, then its
/// new value, then the keys no longer wanted go. A reader sees more rules, never fewer.
fn update_masks<K>(
    map: &mut HashMap<MapData, K, u64>,
    new: &StdHashMap<K, u64>,
    name: &'static str,
) -> Result<(), KernelError>
where
    K: aya::Pod + Eq + std::hash::Hash + Copy,
{
    let old: StdHashMap<K, u64> = map.iter().filter_map(Result::ok).collect();
    for (k, v) in new {
        let union = v | old.get(k).copied().unwrap_or(0);
        map.insert(k, union, 0).map_err(map_err(name))?;
    }
    for (k, v) in new {
        map.insert(k, v, 0).map_err(map_err(name))?;
    }
    for k in old.keys().filter(|k| !new.contains_key(k)) {
        let _ = map.remove(k);
    }
    Ok(())
}

/// Replaces the members of a set map: new members first, then the ones no longer wanted.
fn update_set<K>(
    map: &mut HashMap<MapData, K, u8>,
    new: &HashSet<K>,
    name: &'static str,
) -> Result<(), KernelError>
where
    K: aya::Pod + Eq + std::hash::Hash + Copy,
{
    let old: HashSet<K> = map.keys().filter_map(Result::ok).collect();
    for k in new.difference(&old) {
        map.insert(k, 1, 0).map_err(map_err(name))?;
    }
    for k in old.difference(new) {
        let _ = map.remove(k);
    }
    Ok(())
}

/// A cgroup path as the kernel's cgroup_mkdir tracepoint reports it (`/a/b`), NUL-padded;
/// `None` when it is too long to be matched by name.
pub fn cgroup_path_key(relative: &str) -> Option<CgroupPath> {
    let path = format!("/{}", relative.trim_matches('/'));
    if path.len() >= CGROUP_PATH_LEN {
        return None;
    }
    let mut key = CgroupPath {
        bytes: [0; CGROUP_PATH_LEN],
    };
    key.bytes[..path.len()].copy_from_slice(path.as_bytes());
    Some(key)
}

/// Opens a pidfd for process `pid`.
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `sig` to the process behind `pidfd`: never to another process that reused its pid.
fn pidfd_signal(pidfd: &OwnedFd, sig: i32) -> std::io::Result<()> {
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The verdict key of a held connect, send or mapping.
pub fn verdict_key(ev: &HoldEvent) -> Option<VerdictKey> {
    match HoldKind::from_raw(ev.kind)? {
        HoldKind::Exec => None,
        HoldKind::Map => Some(VerdictKey {
            kind: HoldKind::Map as u32,
            tgid: ev.tgid,
            obj: ev.start_ns,
            ino: ev.file.ino,
            dev: ev.file.dev,
            ..VerdictKey::default()
        }),
        kind @ (HoldKind::Connect | HoldKind::Send) => Some(VerdictKey {
            kind: kind as u32,
            obj: ev.sock,
            ino: ev.sock_ino,
            port: ev.port,
            family: ev.family,
            protocol: ev.protocol,
            addr: ev.addr,
            ..VerdictKey::default()
        }),
    }
}

/// Whether a verdict on `ev` stands for the life of its key: a datagram socket's sends to one
/// destination (chatty UDP is asked once), and a process's mappings of one file.
fn standing(ev: &HoldEvent) -> bool {
    match HoldKind::from_raw(ev.kind) {
        Some(HoldKind::Map) => true,
        Some(HoldKind::Send) => u32::from(ev.sock_type) == libc::SOCK_DGRAM as u32,
        _ => false,
    }
}

impl Kernel {
    /// Loads the programs, reusing maps pinned under `dir` by an earlier agent, attaches them
    /// and pins their links. `btf_path` is the kernel's BTF (normally /sys/kernel/btf/vmlinux);
    /// `max_watched_tasks` sizes the mark table when it is created.
    pub fn load(dir: &Path, btf_path: &Path, max_watched_tasks: u32) -> Result<Self, KernelError> {
        let offsets: KernelOffsets = offsets::resolve(btf_path)?;
        ensure_bpffs(dir)?;
        let layout = dir.join(format!("v{LAYOUT}"));
        let maps_dir = layout.join("maps");
        let links_dir = layout.join("links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).map_err(|source| KernelError::Io {
                what: "creating bpffs directory",
                path: d.clone(),
                source,
            })?;
        }
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(&maps_dir)
            .set_global(OFFSETS_GLOBAL, &offsets, true)
            .set_max_entries(names::WATCHED_TASKS, max_watched_tasks.max(64))
            .load(OBJECT)
            .map_err(|e| KernelError::Load(Box::new(e), maps_dir.display().to_string()))?;
        let btf = Btf::from_sys_fs().map_err(|e| offsets::OffsetError::NoBtf {
            path: "/sys/kernel/btf/vmlinux".into(),
            reason: e.to_string(),
        })?;
        let prog_err = |action, program, hook| {
            move |e: aya::programs::ProgramError| KernelError::Program {
                action,
                program,
                hook,
                source: Box::new(e),
            }
        };
        // The program types share no trait for load/attach, hence a macro.
        macro_rules! attach_all {
            ($programs:expr, $kind:ty) => {
                for (program, hook) in $programs {
                    let p: &mut $kind = ebpf
                        .program_mut(program)
                        .and_then(|p| p.try_into().ok())
                        .ok_or_else(|| {
                        prog_err("lookup", program, hook)(
                            aya::programs::ProgramError::UnexpectedProgramType,
                        )
                    })?;
                    p.load(hook, &btf)
                        .map_err(prog_err("load", program, hook))?;
                    let id = p.attach().map_err(prog_err("attach", program, hook))?;
                    let link: FdLink = p
                        .take_link(id)
                        .map_err(prog_err("attach", program, hook))?
                        .into();
                    pin_replacing(link, &links_dir.join(program))?;
                }
            };
        }
        // Marks, exits and the re-stop first, so no task forked or woken meanwhile escapes.
        attach_all!(TP_PROGRAMS, BtfTracePoint);
        attach_all!(FEXIT_PROGRAMS, FExit);
        attach_all!(LSM_PROGRAMS, Lsm);
        let maps = Maps {
            held: take(&mut ebpf, names::HELD)?,
            verdicts: take(&mut ebpf, names::VERDICTS)?,
            exits: take(&mut ebpf, names::EXITS)?,
            config: take(&mut ebpf, names::CONFIG)?,
            counters: take(&mut ebpf, names::COUNTERS)?,
            uids: take(&mut ebpf, names::WATCH_UIDS)?,
            gids: take(&mut ebpf, names::WATCH_GIDS)?,
            cgroups: take(&mut ebpf, names::WATCH_CGROUPS)?,
            cgroup_paths: take(&mut ebpf, names::WATCH_CGROUP_PATHS)?,
            exec_files: take(&mut ebpf, names::EXEC_FILES)?,
            cleared: take(&mut ebpf, names::CLEARED_FILES)?,
            nets: take(&mut ebpf, names::CONNECT_NETS)?,
            ports: take(&mut ebpf, names::CONNECT_PORTS)?,
        };
        let events: RingBuf<MapData> = take(&mut ebpf, names::EVENTS)?;
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map_err(|e| tracing::debug!(error = %e, "per-program run times unavailable"))
            .ok();
        // The running config, so a restarted agent keeps the settings until it writes its own.
        let config = maps.config.get(&0, 0).unwrap_or_default();
        Ok(Self {
            ebpf: Mutex::new(ebpf),
            root: dir.to_owned(),
            maps: Mutex::new(maps),
            events: Mutex::new(Some(events)),
            config: Mutex::new(config),
            _stats: stats,
        })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ring buffer of hold events; `None` after the first call.
    pub fn take_events(&self) -> Option<RingBuf<MapData>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Replaces the watched uids, gids, cgroup ids and cgroup paths (new ones first, so that
    /// nothing watched before and after is unwatched in between).
    pub fn set_watch(
        &self,
        uids: &[u32],
        gids: &[u32],
        cgroups: &[u64],
        cgroup_paths: &[CgroupPath],
    ) -> Result<(), KernelError> {
        {
            let mut cfg = self.config.lock().unwrap_or_else(|p| p.into_inner());
            // Only with a gid watched do the programs read supplementary groups at all.
            cfg.watch_groups = u32::from(!gids.is_empty());
            let value = *cfg;
            drop(cfg);
            self.maps()
                .config
                .set(0, value, 0)
                .map_err(map_err(names::CONFIG))?;
        }
        let mut m = self.maps();
        update_set(
            &mut m.uids,
            &uids.iter().copied().collect(),
            names::WATCH_UIDS,
        )?;
        update_set(
            &mut m.gids,
            &gids.iter().copied().collect(),
            names::WATCH_GIDS,
        )?;
        update_set(
            &mut m.cgroup_paths,
            &cgroup_paths.iter().copied().collect(),
            names::WATCH_CGROUP_PATHS,
        )?;
        // Cgroups the kernel added itself (made at a watched path, or inside a watched cgroup)
        // stay: `cgroups` is what the agent found, which may lag behind.
        for c in cgroups {
            m.cgroups
                .insert(c, 1, 0)
                .map_err(map_err(names::WATCH_CGROUPS))?;
        }
        Ok(())
    }

    /// Forgets watched cgroup ids that are not in `keep` (the agent's full, fresh list).
    pub fn prune_cgroups(&self, keep: &[u64]) {
        let keep: HashSet<u64> = keep.iter().copied().collect();
        let mut m = self.maps();
        let old: Vec<u64> = m.cgroups.keys().filter_map(Result::ok).collect();
        for c in old.into_iter().filter(|c| !keep.contains(c)) {
            let _ = m.cgroups.remove(&c);
        }
    }

    /// Replaces the prefilter tables (held binaries, destinations, ports) and the exec
    /// settings. Every entry is first widened to cover both the old and the new rules, then
    /// narrowed to the new ones: while this runs the kernel holds at least what either set
    /// holds, and a failure part-way leaves it holding at least what the old set did.
    pub fn set_tables(
        &self,
        t: &KernelTables,
        hold_all_execs: bool,
        hold_self_made: bool,
    ) -> Result<(), KernelError> {
        let mut cfg = *self.config.lock().unwrap_or_else(|p| p.into_inner());
        let widened = Config {
            hold_all_execs: cfg.hold_all_execs | u32::from(hold_all_execs || t.hold_all_execs),
            any_port_mask: cfg.any_port_mask | t.any_port_mask,
            hold_self_made: cfg.hold_self_made | u32::from(hold_self_made),
            ..cfg
        };
        self.write_config(widened)?;
        {
            let mut m = self.maps();
            update_masks(&mut m.exec_files, &t.exec_files, names::EXEC_FILES)?;
            update_masks(&mut m.ports, &t.ports, names::CONNECT_PORTS)?;
            let old: StdHashMap<(u32, [u8; 16]), u64> = m
                .nets
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| ((k.prefix_len(), k.data()), v))
                .collect();
            let new: StdHashMap<(u32, [u8; 16]), u64> = t
                .nets
                .iter()
                .map(|(len, addr, mask)| ((*len, *addr), *mask))
                .collect();
            for pass in [true, false] {
                for ((len, addr), mask) in &new {
                    let v = if pass {
                        mask | old.get(&(*len, *addr)).copied().unwrap_or(0)
                    } else {
                        *mask
                    };
                    m.nets
                        .insert(&Key::new(*len, *addr), v, 0)
                        .map_err(map_err(names::CONNECT_NETS))?;
                }
            }
            for (len, addr) in old.keys().filter(|k| !new.contains_key(k)) {
                let _ = m.nets.remove(&Key::new(*len, *addr));
            }
            // Hashes were judged against the old binaries: judge every file again.
            let cleared: Vec<FileKey> = m.cleared.keys().filter_map(Result::ok).collect();
            for k in cleared {
                let _ = m.cleared.remove(&k);
            }
        }
        cfg.hold_all_execs = u32::from(hold_all_execs || t.hold_all_execs);
        cfg.any_port_mask = t.any_port_mask;
        cfg.hold_self_made = u32::from(hold_self_made);
        self.write_config(cfg)
    }

    fn write_config(&self, cfg: Config) -> Result<(), KernelError> {
        let mut current = self.config.lock().unwrap_or_else(|p| p.into_inner());
        *current = Config {
            heartbeat_ns: current.heartbeat_ns,
            agent_tgid: current.agent_tgid,
            agent_start_ns: current.agent_start_ns,
            heartbeat_timeout_ns: current.heartbeat_timeout_ns,
            watch_groups: current.watch_groups,
            ..cfg
        };
        let value = *current;
        drop(current);
        self.maps()
            .config
            .set(0, value, 0)
            .map_err(map_err(names::CONFIG))
    }

    /// Writes the run-time config with a fresh heartbeat. Call at least every second.
    pub fn heartbeat(&self, agent_tgid: u32, timeout_ns: u64) -> Result<(), KernelError> {
        let start_ns = own_start_boottime_ns();
        let cfg = {
            let mut cfg = self.config.lock().unwrap_or_else(|p| p.into_inner());
            cfg.agent_tgid = agent_tgid;
            cfg.agent_start_ns = start_ns;
            cfg.heartbeat_timeout_ns = timeout_ns;
            cfg.heartbeat_ns = monotonic_ns();
            *cfg
        };
        self.maps()
            .config
            .set(0, cfg, 0)
            .map_err(map_err(names::CONFIG))
    }

    /// Forgets this agent as the agent (on its way out): until the next one registers, nobody
    /// is exempt from the watch or may release a held task, whoever later gets this pid.
    pub fn retire(&self) -> Result<(), KernelError> {
        let cfg = {
            let mut cfg = self.config.lock().unwrap_or_else(|p| p.into_inner());
            cfg.agent_tgid = 0;
            cfg.agent_start_ns = 0;
            *cfg
        };
        self.maps()
            .config
            .set(0, cfg, 0)
            .map_err(map_err(names::CONFIG))
    }

    /// Every thread held right now (for recovery after a restart).
    pub fn held(&self) -> Vec<HoldEvent> {
        self.maps()
            .held
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| v)
            .collect()
    }

    /// Whether `ev` is still the current hold of its thread.
    pub fn is_held(&self, ev: &HoldEvent) -> bool {
        Self::still_held(&self.maps(), ev)
    }

    fn still_held(m: &Maps, ev: &HoldEvent) -> bool {
        is_current_hold(&m.held, ev)
    }

    /// Marks a file the account could have made as checked, as it is now (`stamp`): the kernel
    /// lets its execs through without a hold until it changes.
    pub fn clear_file(&self, key: FileKey, stamp: FileStamp) {
        if let Err(e) = self.maps().cleared.insert(key, stamp, 0) {
            tracing::debug!(error = %e, "could not remember a checked file");
        }
    }

    /// Releases the hold `ev` as `how` says, through a pidfd: a process that exited and whose
    /// pid was reused is never signalled. For an allowed exec, the kernel is asked to record
    /// the exit status (see [`Kernel::take_exit`]).
    pub fn release(&self, ev: &HoldEvent, how: Release) -> Result<Released, KernelError> {
        let Ok(pidfd) = pidfd_open(ev.tgid) else {
            return Ok(Released::Vanished);
        };
        let mut m = self.maps();
        // The hold goes when its thread exits, before the pid can be reused: while it is
        // there, the pidfd opened above names the held process.
        if !Self::still_held(&m, ev) {
            return Ok(Released::Vanished);
        }
        if how == Release::Kill {
            // Kill before un-holding, so nothing else can resume it in between.
            let sent = pidfd_signal(&pidfd, libc::SIGKILL);
            let _ = m.held.remove(&ev.tid);
            return Ok(if sent.is_ok() {
                Released::Done
            } else {
                Released::Vanished
            });
        }
        if let Some(key) = verdict_key(ev) {
            let verdict = Verdict {
                verdict: if how == Release::Resume {
                    VERDICT_ALLOW
                } else {
                    VERDICT_DENY
                },
                standing: u32::from(standing(ev)),
                expires_ns: if standing(ev) {
                    0
                } else {
                    monotonic_ns() + ONE_SHOT_TTL.as_nanos() as u64
                },
            };
            if let Err(e) = m.verdicts.insert(key, verdict, 0) {
                // Without a verdict the restarted call is held (and asked) again: fail closed,
                // never kill what was approved.
                tracing::warn!(error = %e, pid = ev.tgid, "could not write the verdict; the call will be held again");
            }
        } else if how == Release::Resume {
            if let Err(e) = m.exits.insert(ev.tgid, EXIT_PENDING, 0) {
                tracing::debug!(error = %e, pid = ev.tgid, "exit status will not be recorded");
            }
        }
        // Un-hold before SIGCONT: the kernel stops again a held task that wakes.
        let _ = m.held.remove(&ev.tid);
        drop(m);
        match pidfd_signal(&pidfd, libc::SIGCONT) {
            Ok(()) => Ok(Released::Done),
            Err(_) => Ok(Released::Vanished),
        }
    }

    /// The wait status the kernel recorded for a released exec, once it has exited.
    pub fn take_exit(&self, tgid: u32) -> Option<i32> {
        let mut m = self.maps();
        let code = m.exits.get(&tgid, 0).ok()?;
        if code == EXIT_PENDING {
            return None;
        }
        let _ = m.exits.remove(&tgid);
        Some(code)
    }

    /// Forgets an exit status request (the process is gone and its status was not recorded).
    pub fn forget_exit(&self, tgid: u32) {
        let _ = self.maps().exits.remove(&tgid);
    }

    /// Counter totals over all CPUs, indexed by [`agent_common::Counter`].
    pub fn counters(&self) -> Vec<u64> {
        let m = self.maps();
        (0..COUNTER_SLOTS)
            .map(|i| m.counters.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))
            .collect()
    }

    /// Each program's name, run count and total run time (kept while the agent runs, through
    /// `kernel.bpf_stats_enabled`).
    pub fn program_stats(&self) -> Vec<(String, u64, Duration)> {
        let ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        ebpf.programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some((name.to_owned(), info.run_count(), info.run_time()))
            })
            .collect()
    }

    /// Detaches every program and removes every pin: the uninstall. Call after every hold has
    /// been resolved; held tasks are no longer kept after this.
    pub fn unload(&self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Whether `ev` is still the current hold of its thread in `held`.
fn is_current_hold(held: &HashMap<MapData, u32, HoldEvent>, ev: &HoldEvent) -> bool {
    held.get(&ev.tid, 0)
        .is_ok_and(|cur| cur.hold_ns == ev.hold_ns && cur.tgid == ev.tgid)
}

/// Removes this layout's pins under `dir` without loading the programs: the uninstall on a host
/// where they can no longer be loaded (kernel lockdown raised since, say). Holds end in
/// denials, and none is left behind:
///
/// 1. the pinned configuration forgets the agent, so the programs (still attached) kill a
///    watched exec or connect from now on instead of holding it;
/// 2. every task the pinned held map lists is killed (resumed without the programs, its call
///    would run unchecked), until the map is empty: otherwise the pins stay and this fails;
/// 3. the layout's pins go; another layout's (an agent of another version) are named in the
///    error and kept, as nothing here can read their held tasks.
///
/// Returns how many tasks were killed.
pub fn uninstall_pinned(dir: &Path) -> Result<usize, KernelError> {
    let layout = dir.join(format!("v{LAYOUT}"));
    let maps = layout.join("maps");
    let open = |name: &'static str| -> Result<Option<aya::maps::MapData>, KernelError> {
        let pin = maps.join(name);
        if !pin.exists() {
            return Ok(None);
        }
        MapData::from_pin(&pin).map(Some).map_err(map_err(name))
    };
    if let Some(data) = open(names::CONFIG)? {
        let mut config: Array<MapData, Config> =
            Array::try_from(aya::maps::Map::Array(data)).map_err(map_err(names::CONFIG))?;
        let mut cfg = config.get(&0, 0).map_err(map_err(names::CONFIG))?;
        cfg.agent_tgid = 0;
        cfg.agent_start_ns = 0;
        cfg.heartbeat_ns = 0;
        config.set(0, cfg, 0).map_err(map_err(names::CONFIG))?;
    }
    let mut killed = 0;
    if let Some(data) = open(names::HELD)? {
        let mut held: HashMap<MapData, u32, HoldEvent> =
            HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err(names::HELD))?;
        // A killed task's entry goes when it exits (or here, once signalled); a few rounds
        // cover holds that were being made while the configuration changed.
        for round in 0.. {
            let events: Vec<HoldEvent> =
                held.iter().filter_map(Result::ok).map(|(_, v)| v).collect();
            if events.is_empty() {
                break;
            }
            if round == 50 {
                return Err(KernelError::Io {
                    what: "tasks still held after killing them; the pins stay under",
                    path: dir.to_owned(),
                    source: std::io::Error::other(format!(
                        "{} held task(s) left: {:?}",
                        events.len(),
                        events.iter().map(|e| e.tgid).collect::<Vec<_>>()
                    )),
                });
            }
            for ev in events {
                match pidfd_open(ev.tgid) {
                    // The entry goes when its thread exits, before the pid can be reused:
                    // while it is there, the pidfd names the held process.
                    Ok(pidfd) if is_current_hold(&held, &ev) => {
                        if pidfd_signal(&pidfd, libc::SIGKILL).is_ok() {
                            killed += 1;
                            let _ = held.remove(&ev.tid);
                        }
                    }
                    Ok(_) => {}
                    // No such process: an entry its exit did not clear.
                    Err(_) if is_current_hold(&held, &ev) => {
                        let _ = held.remove(&ev.tid);
                    }
                    Err(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if layout.exists() {
        fs::remove_dir_all(&layout).map_err(|source| KernelError::Io {
            what: "removing the pins under",
            path: layout.clone(),
            source,
        })?;
    }
    let others: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if !others.is_empty() {
        return Err(KernelError::Io {
            what: "pins of another agent version are left under",
            path: dir.to_owned(),
            source: std::io::Error::other(format!(
                "{}: uninstall them with that version of airlock-agent (its held tasks cannot be \
                 read by this one)",
                others.join(", ")
            )),
        });
    }
    let _ = fs::remove_dir(dir);
    Ok(killed)
}

/// Names of the counters, in [`agent_common::Counter`] order.
pub const COUNTER_NAMES: [&str; COUNTER_SLOTS as usize] = [
    "hold_exec",
    "hold_connect",
    "pass",
    "drop_ring_full",
    "drop_no_agent",
    "verdict_allow",
    "verdict_deny",
    "blocked_signal",
    "blocked_ptrace",
    "hold_send",
    "hold_map",
    "restopped",
    "refused_traced",
    "refused_indirect",
    "refused_fork",
    "signal_failed",
    "reports_skipped",
];

/// Counter totals by name.
pub fn named_counters(values: &[u64]) -> StdHashMap<&'static str, u64> {
    COUNTER_NAMES
        .iter()
        .copied()
        .zip(values.iter().copied())
        .collect()
}
