//! The kernel side as the agent sees it: loading and pinning the BPF LSM programs, filling
//! their maps, and releasing held tasks.
//!
//! Maps and links are pinned under a bpffs directory. A crashed agent therefore leaves the
//! programs attached (watched tasks keep being held, and fail closed once the heartbeat goes
//! stale), and the restarted agent reopens the same maps and finds every task still held.

pub mod offsets;
pub mod preflight;

use std::{
    collections::HashMap as StdHashMap,
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
};

use agent_common::{
    maps as names, Config, FileKey, HoldEvent, HoldKind, KernelOffsets, VerdictKey, COUNTER_SLOTS,
    EXIT_PENDING, OFFSETS_GLOBAL, VERDICT_ALLOW, VERDICT_DENY,
};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, PerCpuArray, RingBuf,
    },
    programs::{links::FdLink, links::PinnedLink, BtfTracePoint, Lsm},
    Btf, Ebpf, EbpfLoader,
};
use nix::{sys::signal::Signal, unistd::Pid};

use crate::policy::KernelTables;

/// The compiled kernel programs, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/airlock.bpf.o"));

/// LSM programs and the hooks they attach to.
const LSM_PROGRAMS: [(&str, &str); 4] = [
    ("exec_hold", "bprm_committed_creds"),
    ("connect_hold", "socket_connect"),
    ("signal_guard", "task_kill"),
    ("ptrace_guard", "ptrace_access_check"),
];
/// BTF tracepoint programs and their tracepoints.
const TP_PROGRAMS: [(&str, &str); 2] = [
    ("task_fork", "sched_process_fork"),
    ("task_exit", "sched_process_exit"),
];

/// Errors from the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The object could not be loaded (often: pinned maps from an incompatible older agent).
    #[error("loading the BPF object failed: {0}. If an older airlock-agent left maps pinned under {1}, stop every agent and remove that directory")]
    Load(#[source] Box<aya::EbpfError>, String),
    /// A program would not load or attach.
    #[error("{action} of BPF program {program} ({hook}) failed: {source}. If BPF LSM is active (see /sys/kernel/security/lsm), the kernel may forbid trampoline programs here (lockdown, or a kernel without BPF trampoline support)")]
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
    /// Resume the task; a held connect goes through (once).
    Resume,
    /// Kill the task.
    Kill,
    /// Resume the task; its held connect fails with EACCES.
    Refuse,
}

/// Result of releasing a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The signal was delivered.
    Done,
    /// The task had already exited.
    Vanished,
}

/// Handles on the maps the agent reads and writes.
struct Maps {
    held: HashMap<MapData, u32, HoldEvent>,
    verdicts: HashMap<MapData, VerdictKey, u32>,
    exits: HashMap<MapData, u32, i32>,
    config: Array<MapData, Config>,
    counters: PerCpuArray<MapData, u64>,
    uids: HashMap<MapData, u32, u8>,
    gids: HashMap<MapData, u32, u8>,
    cgroups: HashMap<MapData, u64, u8>,
    exec_files: HashMap<MapData, FileKey, u64>,
    nets: LpmTrie<MapData, [u8; 16], u64>,
    ports: HashMap<MapData, u16, u64>,
}

/// The loaded, attached programs and their maps.
pub struct Kernel {
    _ebpf: Ebpf,
    dir: PathBuf,
    maps: Mutex<Maps>,
    events: Mutex<Option<RingBuf<MapData>>>,
    config: Mutex<Config>,
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

fn clear<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<(), KernelError> {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for k in keys {
        map.remove(&k).map_err(map_err(name))?;
    }
    Ok(())
}

/// Monotonic clock in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64
}

impl Kernel {
    /// Loads the programs, reusing maps pinned under `dir` by an earlier agent, attaches them
    /// and pins their links. `btf_path` is the kernel's BTF (normally /sys/kernel/btf/vmlinux).
    pub fn load(dir: &Path, btf_path: &Path) -> Result<Self, KernelError> {
        let offsets: KernelOffsets = offsets::resolve(btf_path)?;
        let maps_dir = dir.join("maps");
        let links_dir = dir.join("links");
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
        // BtfTracePoint and Lsm share no trait for load/attach, hence a macro.
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
        // Fork tracking first, so no task forked meanwhile escapes its mark.
        attach_all!(TP_PROGRAMS, BtfTracePoint);
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
            exec_files: take(&mut ebpf, names::EXEC_FILES)?,
            nets: take(&mut ebpf, names::CONNECT_NETS)?,
            ports: take(&mut ebpf, names::CONNECT_PORTS)?,
        };
        let events: RingBuf<MapData> = take(&mut ebpf, names::EVENTS)?;
        Ok(Self {
            _ebpf: ebpf,
            dir: dir.to_owned(),
            maps: Mutex::new(maps),
            events: Mutex::new(Some(events)),
            config: Mutex::new(Config::default()),
        })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ring buffer of hold events; `None` after the first call.
    pub fn take_events(&self) -> Option<RingBuf<MapData>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Replaces the watched uids, gids and cgroup ids.
    pub fn set_watch(
        &self,
        uids: &[u32],
        gids: &[u32],
        cgroups: &[u64],
    ) -> Result<(), KernelError> {
        let mut m = self.maps();
        clear(&mut m.uids, names::WATCH_UIDS)?;
        clear(&mut m.gids, names::WATCH_GIDS)?;
        clear(&mut m.cgroups, names::WATCH_CGROUPS)?;
        for u in uids {
            m.uids.insert(u, 1, 0).map_err(map_err(names::WATCH_UIDS))?;
        }
        for g in gids {
            m.gids.insert(g, 1, 0).map_err(map_err(names::WATCH_GIDS))?;
        }
        for c in cgroups {
            m.cgroups
                .insert(c, 1, 0)
                .map_err(map_err(names::WATCH_CGROUPS))?;
        }
        Ok(())
    }

    /// Replaces the prefilter tables (held binaries, destinations, ports).
    pub fn set_tables(&self, t: &KernelTables, hold_all_execs: bool) -> Result<(), KernelError> {
        let mut m = self.maps();
        clear(&mut m.exec_files, names::EXEC_FILES)?;
        clear(&mut m.ports, names::CONNECT_PORTS)?;
        let old: Vec<Key<[u8; 16]>> = m.nets.keys().filter_map(Result::ok).collect();
        for k in old {
            m.nets.remove(&k).map_err(map_err(names::CONNECT_NETS))?;
        }
        for (k, v) in &t.exec_files {
            m.exec_files
                .insert(k, v, 0)
                .map_err(map_err(names::EXEC_FILES))?;
        }
        for (len, addr, mask) in &t.nets {
            m.nets
                .insert(&Key::new(*len, *addr), mask, 0)
                .map_err(map_err(names::CONNECT_NETS))?;
        }
        for (p, v) in &t.ports {
            m.ports
                .insert(p, v, 0)
                .map_err(map_err(names::CONNECT_PORTS))?;
        }
        drop(m);
        let mut cfg = self.config.lock().unwrap_or_else(|p| p.into_inner());
        cfg.hold_all_execs = u32::from(hold_all_execs || t.hold_all_execs);
        cfg.any_port_mask = t.any_port_mask;
        Ok(())
    }

    /// Writes the run-time config with a fresh heartbeat. Call at least every second.
    pub fn heartbeat(&self, agent_tgid: u32, timeout_ns: u64) -> Result<(), KernelError> {
        let cfg = {
            let mut cfg = self.config.lock().unwrap_or_else(|p| p.into_inner());
            cfg.agent_tgid = agent_tgid;
            cfg.heartbeat_timeout_ns = timeout_ns;
            cfg.heartbeat_ns = monotonic_ns();
            *cfg
        };
        self.maps()
            .config
            .set(0, cfg, 0)
            .map_err(map_err(names::CONFIG))
    }

    /// Every task held right now (for recovery after a restart, and for shutdown).
    pub fn held(&self) -> Vec<HoldEvent> {
        self.maps()
            .held
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| v)
            .collect()
    }

    /// Whether `ev` is still the current hold of its task.
    pub fn is_held(&self, ev: &HoldEvent) -> bool {
        self.maps()
            .held
            .get(&ev.tgid, 0)
            .is_ok_and(|cur| cur.hold_ns == ev.hold_ns)
    }

    /// Releases the hold `ev` as `how` says. For an allowed exec, the kernel is asked to record
    /// the exit status (see [`Kernel::take_exit`]).
    pub fn release(&self, ev: &HoldEvent, how: Release) -> Result<Released, KernelError> {
        let pid = Pid::from_raw(ev.tgid as i32);
        let mut m = self.maps();
        let is_connect = ev.kind == HoldKind::Connect as u32;
        if is_connect && how != Release::Kill {
            let key = VerdictKey {
                tid: ev.tid,
                port: ev.port,
                family: ev.family,
                addr: ev.addr,
            };
            let v = if how == Release::Resume {
                VERDICT_ALLOW
            } else {
                VERDICT_DENY
            };
            m.verdicts
                .insert(key, v, 0)
                .map_err(map_err(names::VERDICTS))?;
        }
        if !is_connect && how == Release::Resume {
            m.exits
                .insert(ev.tgid, EXIT_PENDING, 0)
                .map_err(map_err(names::EXITS))?;
        }
        let signal = if how == Release::Kill {
            Signal::SIGKILL
        } else {
            Signal::SIGCONT
        };
        // Kill before un-holding, so nothing else can resume it in between; un-hold before
        // SIGCONT, so a restarted connect does not see itself as held.
        if signal == Signal::SIGKILL {
            let sent = nix::sys::signal::kill(pid, signal);
            let _ = m.held.remove(&ev.tgid);
            return Ok(if sent.is_ok() {
                Released::Done
            } else {
                Released::Vanished
            });
        }
        let _ = m.held.remove(&ev.tgid);
        drop(m);
        match nix::sys::signal::kill(pid, signal) {
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

    /// Unpins links and maps: the programs detach when this value is dropped. Used on a clean
    /// shutdown, after every hold has been resolved.
    pub fn unpin_all(&self) {
        for sub in ["links", "maps"] {
            let d = self.dir.join(sub);
            if let Ok(entries) = fs::read_dir(&d) {
                for e in entries.flatten() {
                    let _ = fs::remove_file(e.path());
                }
            }
            let _ = fs::remove_dir(&d);
        }
        let _ = fs::remove_dir(&self.dir);
    }
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
];

/// Counter totals by name.
pub fn named_counters(values: &[u64]) -> StdHashMap<&'static str, u64> {
    COUNTER_NAMES
        .iter()
        .copied()
        .zip(values.iter().copied())
        .collect()
}
