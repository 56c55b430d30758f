//! Airlock's kernel side: BPF LSM programs that hold the exec, connect, send and executable
//! mapping calls of watched tasks until the agent decides, and keep anyone but the agent from
//! releasing or tampering with a held task.
//!
//! Watching
//! - `mark_fork` (lsm/task_alloc): every task a watched task creates, thread or process, is
//!   marked at creation with the uid the watch began with, so descendants stay watched across
//!   setuid, sudo and su, whoever exits first. A full mark table refuses the fork (fails
//!   closed). `unmark` (lsm/task_free) forgets a task when the kernel frees it. The agent is
//!   recognised by pid, start time and a fresh heartbeat, never by pid alone.
//! - `cgroup_made` / `cgroup_gone` (tp_btf/cgroup_mkdir, cgroup_rmdir): a cgroup created at a
//!   watched path (a unit restarted by systemd), or inside a watched cgroup, is watched from its
//!   creation on.
//!
//! Holding
//! - `exec_start` (lsm/bprm_creds_for_exec, once per exec) notes the file an exec named (a
//!   script), `exec_level` (lsm/bprm_check_security, once per binary format level) every
//!   interpreter after it; `exec_hold` (lsm/bprm_committed_creds) holds the exec with SIGSTOP
//!   once the new image is in place and before it runs. A traced task's exec is refused
//!   (killed), since a tracer could change what runs.
//! - `connect_hold` (lsm/socket_connect), `send_hold` (lsm/socket_sendmsg: unconnected UDP, TCP
//!   Fast Open), `map_hold` / `mprotect_hold` (lsm/mmap_file, file_mprotect: a loader mapping a
//!   held binary) return -ERESTARTNOINTR with SIGSTOP; after the agent's SIGCONT the call
//!   restarts and finds the verdict the agent wrote for this socket and destination (or process
//!   and file). Calls that cannot be restarted (io_uring) are refused with EACCES and reported.
//!
//! Keeping the hold
//! - `sctp_connect_guard` (lsm/sctp_bind_connect): SCTP's connect to several addresses cannot
//!   be held; a watched task's to a watched destination is refused.
//! - `restop` (fexit/get_signal): a held task that anyone but the agent wakes (the SIGIO path,
//!   the kernel's SIGCONT to an orphaned process group, a tracer's PTRACE_CONT) is stopped again
//!   before it leaves the kernel: it runs nothing until the agent releases it.
//! - `signal_guard` (lsm/task_kill), `sigio_guard` (lsm/file_send_sigiotask), `ptrace_guard`
//!   (lsm/ptrace_access_check): SIGCONT and ptrace access to a held task are refused outright.
//! - `task_exit` (tp_btf/sched_process_exit): a held thread that exits is no longer held; the
//!   exit status of a released exec is recorded when its whole process is gone.
#![no_std]
#![no_main]

use agent_common::{
    flags, CgroupPath, Config, Counter, ExecStart, FileKey, FileStamp, HoldEvent, HoldKind,
    KernelOffsets, Verdict, VerdictKey, CGROUP_PATH_LEN, ERESTARTNOINTR, VERDICT_ALLOW,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_task_btf, bpf_send_signal, bpf_task_pt_regs},
    },
    macros::{btf_tracepoint, fexit, lsm, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, FExitContext, LsmContext},
};

const SIGKILL: u32 = 9;
const SIGSTOP: u32 = 19;
const SIGCONT: i32 = 18;
const EPERM: i32 = 1;
const ENOMEM: i32 = 12;
const EACCES: i32 = 13;
const AF_UNSPEC: u16 = 0;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_DGRAM: u32 = 2;
/// Clock ticks are 10 ms (USER_HZ 100): the agent knows its start time to within one.
const START_SLACK_NS: u64 = 20_000_000;
/// Superblock magic numbers: files on FUSE are described by their (unprivileged) server, and
/// files in memory can change through a shared mapping without their change time moving.
const FUSE_SUPER_MAGIC: u64 = 0x6573_5546;
const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
/// Supplementary groups checked per task (more are not looked at).
const MAX_GROUPS: u32 = 32;
/// SCTP's connect-by-several-addresses socket options (SCTP_SOCKOPT_CONNECTX_OLD, _CONNECTX,
/// _CONNECTX3) and sendmsg's implicit connect (SCTP_SENDMSG_CONNECT).
const SCTP_CONNECT_OPTS: [i32; 4] = [107, 110, 111, 112];
/// `SS_CONNECTED` of `enum socket_state`.
const SS_CONNECTED: i32 = 3;
const PTRACE_MODE_ATTACH: u32 = 0x02;
const PROT_EXEC: u64 = 0x4;
/// `PF_IO_WORKER`: an io_uring worker thread.
const PF_IO_WORKER: u32 = 0x10;
/// System calls whose -ERESTARTNOINTR restarts after the stop (x86-64, then ia32 compat).
const RESTARTABLE_NET_CALLS: [u64; 9] = [42, 44, 46, 307, 102, 362, 369, 370, 345];

/// Removes `$key` from `$map` if it is there. For the programs every task of the host ends
/// through: a lookup is lock-free, a removal takes the bucket's lock even when there is nothing
/// to remove, and almost no ending task has an entry.
macro_rules! remove_present {
    ($map:expr, $key:expr) => {
        if unsafe { $map.get($key) }.is_some() {
            let _ = $map.remove($key);
        }
    };
}

/// Field offsets of the running kernel, set by the agent at load time from its BTF.
#[no_mangle]
static AIRLOCK_OFFSETS: KernelOffsets = unsafe { core::mem::zeroed() };

/// BPF_F_NO_PREALLOC: entries are allocated when inserted (mandatory for LPM tries).
const NO_PREALLOC: u32 = 1;

/// Not pinned: each agent reads its own ring. Holds published into an earlier agent's ring are
/// still in the pinned held map, which the agent sweeps.
#[map(name = "AIRLOCK_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
#[map(name = "AIRLOCK_HELD")]
static HELD: HashMap<u32, HoldEvent> = HashMap::pinned(16384, 0);
/// The agent sets the size from `agent.max_watched_tasks`.
#[map(name = "AIRLOCK_WATCHED_TASKS")]
static WATCHED_TASKS: HashMap<u64, u32> = HashMap::pinned(131072, NO_PREALLOC);
#[map(name = "AIRLOCK_WATCH_UIDS")]
static WATCH_UIDS: HashMap<u32, u8> = HashMap::pinned(1024, 0);
#[map(name = "AIRLOCK_WATCH_GIDS")]
static WATCH_GIDS: HashMap<u32, u8> = HashMap::pinned(1024, 0);
#[map(name = "AIRLOCK_WATCH_CGROUPS")]
static WATCH_CGROUPS: HashMap<u64, u8> = HashMap::pinned(8192, 0);
#[map(name = "AIRLOCK_WATCH_CGROUP_PATHS")]
static WATCH_CGROUP_PATHS: HashMap<CgroupPath, u8> = HashMap::pinned(1024, 0);
/// Twice the binaries the agent loads: a reload writes the new set before it removes the old.
#[map(name = "AIRLOCK_EXEC_FILES")]
static EXEC_FILES: HashMap<FileKey, u64> = HashMap::pinned(8192, 0);
#[map(name = "AIRLOCK_CLEARED_FILES")]
static CLEARED_FILES: LruHashMap<FileKey, FileStamp> = LruHashMap::pinned(16384, 0);
#[map(name = "AIRLOCK_EXEC_STARTS")]
static EXEC_STARTS: LruHashMap<u64, ExecStart> = LruHashMap::pinned(16384, 0);
#[map(name = "AIRLOCK_CONNECT_NETS")]
static CONNECT_NETS: LpmTrie<[u8; 16], u64> = LpmTrie::pinned(8192, NO_PREALLOC);
#[map(name = "AIRLOCK_CONNECT_PORTS")]
static CONNECT_PORTS: HashMap<u16, u64> = HashMap::pinned(8192, 0);
/// LRU: writing a verdict never fails; an evicted one means the call is asked again.
#[map(name = "AIRLOCK_VERDICTS")]
static VERDICTS: LruHashMap<VerdictKey, Verdict> = LruHashMap::pinned(16384, 0);
#[map(name = "AIRLOCK_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map(name = "AIRLOCK_EXITS")]
static EXITS: LruHashMap<u32, i32> = LruHashMap::pinned(8192, 0);
#[map(name = "AIRLOCK_REPORTED")]
static REPORTED: LruHashMap<u32, u64> = LruHashMap::pinned(4096, 0);
#[map(name = "AIRLOCK_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(agent_common::COUNTER_SLOTS, 0);

/// One field of [`AIRLOCK_OFFSETS`]. Volatile, so the compiler keeps the load from .rodata that
/// the loader patches (one field at a time: each program reads only what it uses).
macro_rules! off {
    ($field:ident) => {{
        #[allow(unused_unsafe)]
        let value =
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!(AIRLOCK_OFFSETS.$field)) };
        value
    }};
}

#[inline(always)]
fn count(c: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(c as u32) {
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

#[inline(always)]
fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// Reads a kernel value at `base + off`.
#[inline(always)]
unsafe fn read_at<T>(base: *const u8, off: u64) -> Result<T, i32> {
    bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T)
}

/// Sends `sig` to the current process; false if the kernel would not.
#[inline(always)]
fn signal_self(sig: u32) -> bool {
    unsafe { bpf_send_signal(sig) == 0 }
}

/// Kills the current process (an exec that must not run). Counts a failure to send.
#[inline(always)]
fn kill_self() {
    if !signal_self(SIGKILL) {
        count(Counter::SignalFailed);
    }
}

/// The current task, its process and thread ids.
struct Current {
    task: u64,
    tgid: u32,
    tid: u32,
}

#[inline(always)]
fn current() -> Current {
    let pid_tgid = bpf_get_current_pid_tgid();
    Current {
        task: unsafe { bpf_get_current_task() },
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
    }
}

/// Whether a watched task is to be held (and with which origin), and whether its mark could be
/// kept.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// Not watched.
    No,
    /// Watched; the uid the watch began with.
    Yes(u32),
    /// Watched now (by uid, gid or cgroup), but the mark table is full: after a setuid it
    /// would not be. Execs fail closed.
    Unmarked(u32),
}

impl Watch {
    fn origin(self) -> Option<u32> {
        match self {
            Watch::No => None,
            Watch::Yes(o) | Watch::Unmarked(o) => Some(o),
        }
    }
}

/// Whether the current task is the running agent: its tgid, its start time (a process that
/// reuses the pid of an agent that is gone is not it), and a fresh heartbeat.
#[inline(always)]
fn is_agent(cur: &Current, cfg: &Config) -> bool {
    if cfg.agent_tgid == 0 || cur.tgid != cfg.agent_tgid || !agent_alive(cfg) {
        return false;
    }
    let start = unsafe {
        read_at::<*const u8>(cur.task as *const u8, off!(task_group_leader))
            .and_then(|leader| read_at::<u64>(leader, off!(task_start_boottime)))
    };
    start.is_ok_and(|s| s.abs_diff(cfg.agent_start_ns) <= START_SLACK_NS)
}

/// Whether one of the current task's supplementary groups is watched.
#[inline(always)]
fn watched_group(task: u64) -> bool {
    unsafe {
        let Ok(cred) = read_at::<*const u8>(task as *const u8, off!(task_cred)) else {
            return false;
        };
        let Ok(info) = read_at::<*const u8>(cred, off!(cred_group_info)) else {
            return false;
        };
        let n = read_at::<i32>(info, off!(group_info_ngroups)).unwrap_or(0);
        let base = info.wrapping_add(off!(group_info_gid) as usize);
        for i in 0..MAX_GROUPS {
            if i as i32 >= n {
                break;
            }
            if let Ok(gid) = read_at::<u32>(base, u64::from(i) * 4) {
                if WATCH_GIDS.get(gid).is_some() {
                    return true;
                }
            }
        }
        false
    }
}

/// Whether the current task is watched: marked (inherited), or by uid, gid (primary or
/// supplementary) or cgroup. The agent itself never is. A task watched by uid, gid or cgroup
/// is marked with its uid, so the watch survives a later setuid in this very task.
#[inline(always)]
fn watched(cur: &Current, cfg: &Config) -> Watch {
    if is_agent(cur, cfg) {
        return Watch::No;
    }
    if let Some(origin) = unsafe { WATCHED_TASKS.get(cur.task) } {
        return Watch::Yes(*origin);
    }
    let ids = bpf_get_current_uid_gid();
    let uid = ids as u32;
    let gid = (ids >> 32) as u32;
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let watched = unsafe {
        WATCH_UIDS.get(uid).is_some()
            || WATCH_GIDS.get(gid).is_some()
            || WATCH_CGROUPS.get(cgroup).is_some()
    } || (cfg.watch_groups != 0 && watched_group(cur.task));
    if !watched {
        return Watch::No;
    }
    if WATCHED_TASKS.insert(cur.task, uid, 0).is_err() {
        return Watch::Unmarked(uid);
    }
    Watch::Yes(uid)
}

/// Whether the agent is alive (recent heartbeat). When it is not, holds fail closed.
#[inline(always)]
fn agent_alive(cfg: &Config) -> bool {
    cfg.agent_tgid != 0 && now_ns().saturating_sub(cfg.heartbeat_ns) <= cfg.heartbeat_timeout_ns
}

/// Start time of the current process (its leader's), which with the tgid names it for good.
#[inline(always)]
fn process_start(task: u64) -> u64 {
    unsafe {
        let Ok(leader) = read_at::<*const u8>(task as *const u8, off!(task_group_leader)) else {
            return 0;
        };
        read_at::<u64>(leader, off!(task_start_time)).unwrap_or(0)
    }
}

/// Fills the common part of an event for the current task (in place: the stack is small).
#[inline(always)]
fn fill_event(ev: &mut HoldEvent, cur: &Current, kind: HoldKind, rule_mask: u64, origin: u32) {
    let ids = bpf_get_current_uid_gid();
    ev.origin_uid = origin;
    ev.kind = kind as u32;
    ev.tgid = cur.tgid;
    ev.tid = cur.tid;
    ev.uid = ids as u32;
    ev.gid = (ids >> 32) as u32;
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    ev.hold_ns = now_ns();
    ev.start_ns = process_start(cur.task);
    ev.rule_mask = rule_mask;
    if let Ok(comm) = bpf_get_current_comm() {
        ev.comm = comm;
    }
}

/// Sends `ev` to the agent through the ring. False when the ring is full. (The helper copies
/// the event: an inline copy into reserved ring memory is refused by older verifiers.)
#[inline(always)]
fn report(ev: &HoldEvent) -> bool {
    if EVENTS.output::<HoldEvent>(ev, 0).is_err() {
        count(Counter::DropRingFull);
        return false;
    }
    true
}

/// Reports a refusal the kernel made on its own (no hold): at most once a second per process,
/// so a process repeating a refused call cannot fill the ring and starve the holds of others.
#[inline(always)]
fn report_refusal(ev: &HoldEvent) {
    let now = now_ns();
    if let Some(last) = unsafe { REPORTED.get(ev.tgid) } {
        if now.saturating_sub(*last) < 1_000_000_000 {
            count(Counter::ReportsSkipped);
            return;
        }
    }
    let _ = REPORTED.insert(ev.tgid, now, 0);
    report(ev);
}

/// Whether the current task is being traced: a tracer could change what a held call or
/// program does between the decision and the run (PTRACE_POKEDATA needs no new permission).
#[inline(always)]
fn traced(cur: &Current) -> bool {
    unsafe { read_at::<u32>(cur.task as *const u8, off!(task_ptrace)) }.unwrap_or(1) != 0
}

/// Records the hold of the current thread and tells the agent. False when it could not be
/// delivered (the caller then fails closed).
#[inline(always)]
fn publish(ev: &HoldEvent) -> bool {
    if HELD.insert(ev.tid, ev, 0).is_err() {
        count(Counter::DropRingFull);
        return false;
    }
    if !report(ev) {
        let _ = HELD.remove(ev.tid);
        return false;
    }
    true
}

/// Stops the current process for a published hold. False (and the hold withdrawn) when the
/// stop could not be sent.
#[inline(always)]
fn stop_for(ev: &HoldEvent) -> bool {
    if signal_self(SIGSTOP) {
        return true;
    }
    let _ = HELD.remove(ev.tid);
    count(Counter::SignalFailed);
    false
}

// --- files --------------------------------------------------------------------------------

/// A file as the programs see it: its inode and super block, and the key rules name it by.
/// Only the key is read up front; what else is needed is read when it is (most calls need
/// no more than the key).
struct FileRef {
    inode: *const u8,
    sb: *const u8,
    key: FileKey,
}

/// The inode, super block, device and inode number of `file`.
#[inline(always)]
fn file_ref(file: *const u8) -> Option<FileRef> {
    unsafe {
        let inode = read_at::<*const u8>(file, off!(file_inode)).ok()?;
        let ino = read_at::<u64>(inode, off!(inode_ino)).ok()?;
        let sb = read_at::<*const u8>(inode, off!(inode_sb)).ok()?;
        let dev = read_at::<u32>(sb, off!(sb_dev)).ok()?;
        Some(FileRef {
            inode,
            sb,
            key: FileKey { ino, dev, pad: 0 },
        })
    }
}

/// Whether the account of uid `uid` and gid `gid` could have made `f`: owned by it, or writable
/// by it (world-writable, or group-writable with its group), or on a file system an
/// unprivileged user controls (FUSE, whose server describes its files, or one mounted in a user
/// namespace, such as an overlay over a held binary's directory). Root made everything it runs,
/// so nothing counts as self-made for root. `Some(volatile)` when it could: `volatile` when its
/// contents can change without its change time moving (a file in memory, changed through a
/// shared mapping), so a hash of it is never remembered.
#[inline(always)]
fn self_made(f: &FileRef, uid: u32, gid: u32) -> Option<bool> {
    if uid == 0 {
        return None;
    }
    unsafe {
        let magic = read_at::<u64>(f.sb, off!(sb_magic)).unwrap_or(0);
        let user_ns_level = read_at::<*const u8>(f.sb, off!(sb_user_ns))
            .and_then(|ns| read_at::<u32>(ns, off!(user_ns_level)))
            .unwrap_or(0);
        let foreign_fs = magic == FUSE_SUPER_MAGIC || user_ns_level != 0;
        let made = foreign_fs || {
            let owner = read_at::<u32>(f.inode, off!(inode_uid)).unwrap_or(0);
            let mode = read_at::<u16>(f.inode, off!(inode_mode)).unwrap_or(0);
            owner == uid
                || mode & 0o002 != 0
                || (mode & 0o020 != 0
                    && read_at::<u32>(f.inode, off!(inode_gid)).unwrap_or(0) == gid)
        };
        made.then_some(
            foreign_fs || magic == TMPFS_MAGIC || magic == RAMFS_MAGIC || magic == HUGETLBFS_MAGIC,
        )
    }
}

/// The change time of `f`.
#[inline(always)]
fn stamp(f: &FileRef) -> FileStamp {
    unsafe {
        let sec = read_at::<i64>(f.inode, off!(inode_ctime_sec)).unwrap_or(0);
        let nsec = if off!(inode_ctime_nsec_size) == 4 {
            u64::from(read_at::<u32>(f.inode, off!(inode_ctime_nsec)).unwrap_or(0))
        } else {
            read_at::<u64>(f.inode, off!(inode_ctime_nsec)).unwrap_or(0)
        };
        FileStamp { sec, nsec }
    }
}

/// Whether `f` must be held to be hashed: a self-made file (see [`self_made`]) that the agent
/// has not cleared as it is now. `Some(its change time)` when it must.
#[inline(always)]
fn needs_hash(cfg: &Config, f: &FileRef) -> Option<FileStamp> {
    if cfg.hold_self_made == 0 {
        return None;
    }
    let (uid, gid) = current_ids();
    let volatile = self_made(f, uid, gid)?;
    let now = stamp(f);
    if volatile {
        return Some(now);
    }
    match unsafe { CLEARED_FILES.get(f.key) } {
        Some(cleared) if *cleared == now => None,
        _ => Some(now),
    }
}

#[inline(always)]
fn current_ids() -> (u32, u32) {
    let ids = bpf_get_current_uid_gid();
    (ids as u32, (ids >> 32) as u32)
}

// --- watching -----------------------------------------------------------------------------

#[lsm(hook = "task_alloc")]
pub fn mark_fork(ctx: LsmContext) -> i32 {
    let Some(cfg) = config() else { return 0 };
    let cur = current();
    let Some(origin) = watched(&cur, cfg).origin() else {
        return 0;
    };
    let child: *const u8 = ctx.arg(0);
    if WATCHED_TASKS.insert(child as u64, origin, 0).is_err() {
        // A new task that could not be marked would run unwatched after a setuid: no fork.
        count(Counter::RefusedFork);
        return -ENOMEM;
    }
    0
}

#[lsm(hook = "task_free")]
pub fn unmark(ctx: LsmContext) -> i32 {
    let task = ctx.arg::<*const u8>(0) as u64;
    remove_present!(WATCHED_TASKS, task);
    remove_present!(EXEC_STARTS, task);
    0
}

/// The kernfs id of `cgroup` (its cgroup id) and of its parent.
#[inline(always)]
fn cgroup_ids(cgroup: *const u8) -> Option<(u64, u64)> {
    unsafe {
        let kn = read_at::<*const u8>(cgroup, off!(cgroup_kn)).ok()?;
        let id = read_at::<u64>(kn, off!(kernfs_id)).ok()?;
        let parent = read_at::<*const u8>(kn, off!(kernfs_parent)).ok()?;
        let parent_id = if parent.is_null() {
            0
        } else {
            read_at::<u64>(parent, off!(kernfs_id)).unwrap_or(0)
        };
        Some((id, parent_id))
    }
}

#[btf_tracepoint(function = "cgroup_mkdir")]
pub fn cgroup_made(ctx: BtfTracePointContext) -> i32 {
    let cgroup: *const u8 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    let Some((id, parent)) = cgroup_ids(cgroup) else {
        return 0;
    };
    let mut key = CgroupPath {
        bytes: [0; CGROUP_PATH_LEN],
    };
    let by_path = unsafe { bpf_probe_read_kernel_str_bytes(path, &mut key.bytes) }.is_ok()
        && unsafe { WATCH_CGROUP_PATHS.get(key) }.is_some();
    if by_path || unsafe { WATCH_CGROUPS.get(parent) }.is_some() {
        let _ = WATCH_CGROUPS.insert(id, 1, 0);
    }
    0
}

#[btf_tracepoint(function = "cgroup_rmdir")]
pub fn cgroup_gone(ctx: BtfTracePointContext) -> i32 {
    let cgroup: *const u8 = ctx.arg(0);
    if let Some((id, _)) = cgroup_ids(cgroup) {
        let _ = WATCH_CGROUPS.remove(id);
    }
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn task_exit(ctx: BtfTracePointContext) -> i32 {
    let cur = current();
    // A held thread that exits (killed, or its process ended) holds nothing any more.
    remove_present!(HELD, cur.tid);
    let task: *const u8 = ctx.arg(0);
    // The process is gone when its last thread goes: signal->live has dropped to zero.
    let live = unsafe {
        read_at::<*const u8>(task, off!(task_signal))
            .and_then(|signal| read_at::<i32>(signal, off!(signal_live)))
    };
    if live != Ok(0) {
        return 0;
    }
    if let Some(slot) = EXITS.get_ptr_mut(cur.tgid) {
        if let Ok(code) = unsafe { read_at::<i32>(task, off!(task_exit_code)) } {
            unsafe { *slot = code };
        }
    }
    0
}

// --- exec ---------------------------------------------------------------------------------

/// The file `bprm` is at now (the named file at the start, each interpreter after).
#[inline(always)]
fn bprm_file(bprm: *const u8) -> Option<FileRef> {
    let file = unsafe { read_at::<*const u8>(bprm, off!(binprm_file)) }.ok()?;
    file_ref(file)
}

#[lsm(hook = "bprm_creds_for_exec")]
pub fn exec_start(ctx: LsmContext) -> i32 {
    let Some(cfg) = config() else { return 0 };
    let cur = current();
    if watched(&cur, cfg) == Watch::No {
        return 0;
    }
    // Once per exec, before any binary format looks at it: a fresh record, so that nothing of
    // an earlier exec (one that failed after its checks) is taken for this one's.
    let bprm: *const u8 = ctx.arg(0);
    let Some(f) = bprm_file(bprm) else {
        return 0;
    };
    let hash = needs_hash(cfg, &f);
    let start = ExecStart {
        bprm: bprm as u64,
        file: f.key,
        stamp: hash.unwrap_or_default(),
        rule_mask: unsafe { EXEC_FILES.get(f.key) }.copied().unwrap_or(0),
        self_made: u32::from(hash.is_some()),
        argc: unsafe { read_at::<u32>(bprm, off!(binprm_argc)) }.unwrap_or(0),
        ..ExecStart::default()
    };
    let _ = EXEC_STARTS.insert(cur.task, start, 0);
    0
}

#[lsm(hook = "bprm_check_security")]
pub fn exec_level(ctx: LsmContext) -> i32 {
    let Some(cfg) = config() else { return 0 };
    let cur = current();
    if watched(&cur, cfg) == Watch::No {
        return 0;
    }
    // Once per binary format level: a script's interpreter, and an interpreter's interpreter.
    let bprm: *const u8 = ctx.arg(0);
    let Some(start) = EXEC_STARTS.get_ptr_mut(cur.task) else {
        return 0;
    };
    let start = unsafe { &mut *start };
    if start.bprm != bprm as u64 {
        return 0;
    }
    let Some(f) = bprm_file(bprm) else {
        return 0;
    };
    if f.key == start.file {
        return 0;
    }
    start.rule_mask |= unsafe { EXEC_FILES.get(f.key) }.copied().unwrap_or(0);
    if start.self_made == 0 {
        if let Some(stamp) = needs_hash(cfg, &f) {
            start.self_made = 1;
            start.stamp = stamp;
        }
    }
    // Every level is recorded (the last one runs; those before it are interpreters between):
    // past the table's room, a level still adds its rules but not its name.
    match start.levels {
        0 => start.middle[0] = f.key,
        1 => start.middle[1] = f.key,
        2 => start.middle[2] = f.key,
        _ => {}
    }
    start.levels += 1;
    0
}

#[lsm(hook = "bprm_committed_creds")]
pub fn exec_hold(ctx: LsmContext) -> i32 {
    let Some(cfg) = config() else { return 0 };
    let cur = current();
    let watch = watched(&cur, cfg);
    let Some(origin) = watch.origin() else {
        return 0;
    };
    let bprm: *const u8 = ctx.arg(0);
    let Some(run) = bprm_file(bprm) else {
        return 0;
    };
    let start = unsafe { EXEC_STARTS.get(cur.task) }
        .copied()
        .filter(|s| s.bprm == bprm as u64);
    let _ = EXEC_STARTS.remove(cur.task);
    let rule_mask =
        unsafe { EXEC_FILES.get(run.key) }.copied().unwrap_or(0) | start.map_or(0, |s| s.rule_mask);
    // The change time of the self-made file: the named one (or an interpreter between) if that
    // is self-made, else the one that runs.
    let hash = match start.filter(|s| s.self_made != 0) {
        Some(s) => Some(s.stamp),
        None => needs_hash(cfg, &run),
    };
    // Decided before the event is built: most execs pass, and should cost no more than this.
    if rule_mask == 0 && cfg.hold_all_execs == 0 && hash.is_none() {
        count(Counter::Pass);
        return 0;
    }
    let mut ev = HoldEvent::default();
    fill_event(&mut ev, &cur, HoldKind::Exec, rule_mask, origin);
    ev.file = run.key;
    ev.named = run.key;
    if let Some(stamp) = hash {
        ev.flags |= flags::SELF_MADE;
        ev.stamp = stamp;
    }
    if let Some(s) = start {
        ev.argc = s.argc;
        if s.file != run.key {
            ev.flags |= flags::SCRIPT;
            ev.named = s.file;
            ev.middle = s.middle;
        }
    }
    // A second attached copy of this program (while an agent upgrade swaps them) holds it.
    if unsafe { HELD.get(cur.tid) }.is_some() {
        return 0;
    }
    // exec holds cred_guard_mutex here, so no tracer can attach between this check and the
    // hold (ptrace_attach takes it too, and is refused for held tasks afterwards).
    if traced(&cur) {
        ev.flags |= flags::TRACED | flags::REFUSED;
        count(Counter::RefusedTraced);
        report_refusal(&ev);
        kill_self();
        return 0;
    }
    // A task that could not be marked would be free after a setuid: no exec.
    if let Watch::Unmarked(_) = watch {
        count(Counter::RefusedFork);
        kill_self();
        return 0;
    }
    if !agent_alive(cfg) {
        count(Counter::DropNoAgent);
        kill_self();
        return 0;
    }
    if !publish(&ev) {
        kill_self();
        return 0;
    }
    if !stop_for(&ev) {
        kill_self();
        return 0;
    }
    count(Counter::HoldExec);
    0
}

// --- executable mappings (a loader running a held binary) ---------------------------------

/// Holds an executable mapping of `file` by a watched task, unless it is the task's own program
/// (the kernel maps that during the exec, which was held already).
#[inline(always)]
fn map_hold(file: *const u8, prot: u64) -> i32 {
    if file.is_null() || prot & PROT_EXEC == 0 {
        return 0;
    }
    let Some(cfg) = config() else { return 0 };
    let cur = current();
    let Some(origin) = watched(&cur, cfg).origin() else {
        return 0;
    };
    let Some(f) = file_ref(file) else {
        return 0;
    };
    let rule_mask = unsafe { EXEC_FILES.get(f.key) }.copied().unwrap_or(0);
    let hash = needs_hash(cfg, &f);
    if rule_mask == 0 && hash.is_none() {
        return 0;
    }
    let own = unsafe {
        read_at::<*const u8>(cur.task as *const u8, off!(task_mm))
            .and_then(|mm| read_at::<*const u8>(mm, off!(mm_exe_file)))
            .ok()
            .and_then(file_ref)
    };
    if own.is_some_and(|o| o.key == f.key) {
        return 0;
    }
    {
        let vkey = VerdictKey {
            kind: HoldKind::Map as u32,
            tgid: cur.tgid,
            obj: process_start(cur.task),
            ino: f.key.ino,
            dev: f.key.dev,
            ..VerdictKey::default()
        };
        match use_verdict(&vkey) {
            Some(true) => return 0,
            Some(false) => return -EACCES,
            None => {}
        }
    }
    if unsafe { HELD.get(cur.tid) }.is_some() {
        return ERESTARTNOINTR;
    }
    let mut ev = HoldEvent::default();
    fill_event(&mut ev, &cur, HoldKind::Map, rule_mask, origin);
    ev.file = f.key;
    ev.named = f.key;
    if let Some(stamp) = hash {
        ev.flags |= flags::SELF_MADE;
        ev.stamp = stamp;
    }
    if traced(&cur) {
        ev.flags |= flags::TRACED | flags::REFUSED;
        count(Counter::RefusedTraced);
        report_refusal(&ev);
        return -EACCES;
    }
    if !agent_alive(cfg) {
        count(Counter::DropNoAgent);
        return -EACCES;
    }
    if !publish(&ev) || !stop_for(&ev) {
        return -EACCES;
    }
    count(Counter::HoldMap);
    ERESTARTNOINTR
}

#[lsm(hook = "mmap_file")]
pub fn mmap_hold(ctx: LsmContext) -> i32 {
    let file: *const u8 = ctx.arg(0);
    // Both loads at constant offsets, then a choice: the verifier refuses a variable offset
    // into the context.
    let (one, two): (u64, u64) = (ctx.arg(1), ctx.arg(2));
    let prot = if off!(mmap_prot_arg) == 1 { one } else { two };
    map_hold(file, prot)
}

#[lsm(hook = "file_mprotect")]
pub fn mprotect_hold(ctx: LsmContext) -> i32 {
    let vma: *const u8 = ctx.arg(0);
    let (one, two): (u64, u64) = (ctx.arg(1), ctx.arg(2));
    let prot = if off!(mprotect_prot_arg) == 1 {
        one
    } else {
        two
    };
    let Ok(file) = (unsafe { read_at::<*const u8>(vma, off!(vma_file)) }) else {
        return 0;
    };
    map_hold(file, prot)
}

// --- connects and sends -------------------------------------------------------------------

/// The verdict for `key`, if the agent wrote one that still stands: `Some(true)` to let the
/// call through, `Some(false)` to refuse it. A one-shot verdict is used up here. (A function of
/// its own: its frame is not added to the callers'. It returns a choice, not an errno: the
/// caller returns constants, which stay sign-extended in the 64-bit register newer verifiers
/// check against [-4095, 0].)
#[inline(never)]
fn use_verdict(key: &VerdictKey) -> Option<bool> {
    let v = unsafe { VERDICTS.get(key) }.copied()?;
    if v.expires_ns != 0 && now_ns() > v.expires_ns {
        let _ = VERDICTS.remove(key);
        return None;
    }
    if v.standing == 0 {
        let _ = VERDICTS.remove(key);
    }
    if v.verdict == VERDICT_ALLOW {
        count(Counter::VerdictAllow);
        Some(true)
    } else {
        count(Counter::VerdictDeny);
        Some(false)
    }
}

/// Whether the current call can be restarted after a stop: a connect or send system call made
/// by the task itself. io_uring (its workers, or its submission from io_uring_enter) cannot:
/// there -ERESTARTNOINTR turns into EINTR.
#[inline(always)]
fn restartable(cur: &Current) -> bool {
    let flags = unsafe { read_at::<u32>(cur.task as *const u8, off!(task_flags)) }.unwrap_or(0);
    if flags & PF_IO_WORKER != 0 {
        return false;
    }
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) };
    if regs == 0 {
        return false;
    }
    let Ok(nr) = (unsafe { read_at::<u64>(regs as *const u8, off!(regs_orig_ax)) }) else {
        return false;
    };
    RESTARTABLE_NET_CALLS.contains(&nr)
}

/// The first eight bytes of a `struct sockaddr_in` (and of a `sockaddr_in6`, up to its flow
/// info): read at once, one helper call instead of three.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockaddrHead {
    family: u16,
    /// Network byte order.
    port: u16,
    /// IPv4: the address. IPv6: the flow info.
    v4: [u8; 4],
}

/// A destination from a `struct sockaddr` in kernel memory, on a socket whose family
/// `sock_family` tells (asked only for AF_UNSPEC): family, address (IPv6, IPv4 mapped) and
/// port. `None` for other families or a short address. An IPv4 socket takes AF_UNSPEC as IPv4
/// (udp_sendmsg does); the unspecified address (0.0.0.0, ::) reaches this host, so it is taken
/// as loopback.
#[inline(always)]
fn destination(
    addr: *const u8,
    len: i32,
    sock_family: impl FnOnce() -> u16,
) -> Option<(u16, [u8; 16], u16)> {
    // The address is a copy in kernel memory of at least `struct sockaddr` (16 bytes): the
    // system calls copy it into a `sockaddr_storage`.
    let head = unsafe { read_at::<SockaddrHead>(addr, 0) }.ok()?;
    let mut family = head.family;
    if family == AF_UNSPEC && sock_family() == AF_INET {
        family = AF_INET;
    }
    let port = u16::from_be(head.port);
    let mut ip = [0u8; 16];
    match family {
        AF_INET if len >= 8 => {
            let v4 = head.v4;
            ip[10] = 0xff;
            ip[11] = 0xff;
            ip[12..16].copy_from_slice(&v4);
            if v4 == [0; 4] {
                ip[12] = 127;
                ip[15] = 1;
            }
        }
        AF_INET6 if len >= 24 => {
            ip = unsafe { read_at::<[u8; 16]>(addr, 8) }.ok()?;
            if ip == [0; 16] {
                ip[15] = 1;
            } else if ip[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] && ip[12..] == [0; 4] {
                ip[12] = 127;
                ip[15] = 1;
            }
        }
        _ => return None,
    }
    Some((family, ip, port))
}

/// Which rules' prefilter a destination passes (bit per rule; 0: none). The port first: rules
/// mostly name ports, and a hash lookup of the port is cheaper than the address's walk of the
/// prefix trie.
#[inline(always)]
fn destination_rules(cfg: &Config, ip: [u8; 16], port: u16) -> u64 {
    let port_mask = unsafe { CONNECT_PORTS.get(port) }.copied().unwrap_or(0) | cfg.any_port_mask;
    if port_mask == 0 {
        return 0;
    }
    let Some(net_mask) = CONNECT_NETS.get(Key::new(128, ip)) else {
        return 0;
    };
    *net_mask & port_mask
}

/// The family of `sock`'s `struct sock` (AF_INET, AF_INET6, ...).
#[inline(always)]
fn sock_family(sock: *const u8) -> u16 {
    unsafe {
        read_at::<*const u8>(sock, off!(socket_sk))
            .and_then(|sk| read_at::<u16>(sk, off!(sock_family)))
    }
    .unwrap_or(0)
}

/// Holds (or lets through, or refuses) a connect or addressed send on `sock` to `addr`. Every
/// socket type is held: stream and datagram, and SCTP's, DCCP's and the rest like stream.
///
/// The destination is checked before the task's watch: most connects and sends, of watched
/// tasks or not, go where no rule looks, and leave after the port's lookup.
#[inline(always)]
fn net_hold(sock: *const u8, addr: *const u8, len: i32, kind: HoldKind, send: bool) -> i32 {
    let Some(cfg) = config() else { return 0 };
    let Some((family, ip, port)) = destination(addr, len, || sock_family(sock)) else {
        return 0;
    };
    let rule_mask = destination_rules(cfg, ip, port);
    if rule_mask == 0 {
        return 0;
    }
    let cur = current();
    let Some(origin) = watched(&cur, cfg).origin() else {
        return 0;
    };
    let sock_type = match unsafe { read_at::<i16>(sock, off!(socket_type)) } {
        Ok(t) => t as u32,
        Err(_) => return 0,
    };
    let mut fastopen = false;
    if send && sock_type != SOCK_DGRAM {
        // A stream socket's send names a destination only for TCP Fast Open; once connected,
        // the address is ignored.
        if unsafe { read_at::<i32>(sock, off!(socket_state)) }.unwrap_or(SS_CONNECTED)
            == SS_CONNECTED
        {
            return 0;
        }
        fastopen = true;
    }
    let protocol = unsafe {
        read_at::<*const u8>(sock, off!(socket_sk))
            .and_then(|sk| read_at::<u16>(sk, off!(sock_protocol)))
    }
    .unwrap_or(0);
    let sock_ino = unsafe {
        read_at::<u64>(
            sock.wrapping_add(off!(socket_alloc_inode) as usize),
            off!(inode_ino),
        )
    }
    .unwrap_or(0);
    {
        let vkey = VerdictKey {
            kind: kind as u32,
            obj: sock as u64,
            ino: sock_ino,
            port,
            family,
            protocol,
            addr: ip,
            ..VerdictKey::default()
        };
        match use_verdict(&vkey) {
            Some(true) => return 0,
            Some(false) => return -EACCES,
            None => {}
        }
    }
    if unsafe { HELD.get(cur.tid) }.is_some() {
        return ERESTARTNOINTR;
    }
    let mut ev = HoldEvent::default();
    fill_event(&mut ev, &cur, kind, rule_mask, origin);
    ev.family = family;
    ev.port = port;
    ev.addr = ip;
    ev.sock_type = sock_type as u16;
    ev.protocol = protocol;
    ev.sock = sock as u64;
    ev.sock_ino = sock_ino;
    if fastopen {
        ev.flags |= flags::FASTOPEN;
    }
    if !restartable(&cur) {
        ev.flags |= flags::INDIRECT | flags::REFUSED;
        count(Counter::RefusedIndirect);
        report_refusal(&ev);
        return -EACCES;
    }
    if traced(&cur) {
        ev.flags |= flags::TRACED | flags::REFUSED;
        count(Counter::RefusedTraced);
        report_refusal(&ev);
        return -EACCES;
    }
    if !agent_alive(cfg) {
        count(Counter::DropNoAgent);
        return -EACCES;
    }
    if !publish(&ev) || !stop_for(&ev) {
        return -EACCES;
    }
    count(if send {
        Counter::HoldSend
    } else {
        Counter::HoldConnect
    });
    ERESTARTNOINTR
}

#[lsm(hook = "socket_connect")]
pub fn connect_hold(ctx: LsmContext) -> i32 {
    let sock: *const u8 = ctx.arg(0);
    let addr: *const u8 = ctx.arg(1);
    let len: i32 = ctx.arg(2);
    net_hold(sock, addr, len, HoldKind::Connect, false)
}

/// `msg_name` and `msg_namelen` of a `struct msghdr`.
#[repr(C)]
#[derive(Clone, Copy)]
struct MsgName {
    name: *const u8,
    len: i32,
}

#[lsm(hook = "socket_sendmsg")]
pub fn send_hold(ctx: LsmContext) -> i32 {
    let sock: *const u8 = ctx.arg(0);
    let msg: *const u8 = ctx.arg(1);
    // Most sends name no destination: one read and out. The name's length follows the name
    // in every kernel's `struct msghdr`; both come in that one read.
    let (name, len) = if off!(msghdr_namelen) == off!(msghdr_name) + 8 {
        match unsafe { read_at::<MsgName>(msg, off!(msghdr_name)) } {
            Ok(m) => (m.name, m.len),
            Err(_) => return 0,
        }
    } else {
        let Ok(name) = (unsafe { read_at::<*const u8>(msg, off!(msghdr_name)) }) else {
            return 0;
        };
        (
            name,
            unsafe { read_at::<i32>(msg, off!(msghdr_namelen)) }.unwrap_or(0),
        )
    };
    if name.is_null() {
        return 0;
    }
    net_hold(sock, name, len, HoldKind::Send, true)
}

/// SCTP's connect with several addresses (and sendmsg's implicit connect) bypasses
/// socket_connect: a watched task's is refused when any of its addresses (the first eight; a
/// longer list is refused whole) is watched.
#[lsm(hook = "sctp_bind_connect")]
pub fn sctp_connect_guard(ctx: LsmContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let optname: i32 = ctx.arg(1);
    let addrs: *const u8 = ctx.arg(2);
    let len: i32 = ctx.arg(3);
    if !SCTP_CONNECT_OPTS.contains(&optname) {
        return 0;
    }
    let Some(cfg) = config() else { return 0 };
    let cur = current();
    let Some(origin) = watched(&cur, cfg).origin() else {
        return 0;
    };
    let mut offset: i32 = 0;
    let mut watched_dest = false;
    for _ in 0..8 {
        if offset >= len {
            break;
        }
        let at = addrs.wrapping_add(offset as usize);
        let family = unsafe { read_at::<u16>(at, 0) }.unwrap_or(0);
        let size = if family == AF_INET6 { 28 } else { 16 };
        if let Some((_, ip, port)) = destination(at, size, || family) {
            if destination_rules(cfg, ip, port) != 0 {
                watched_dest = true;
                break;
            }
        }
        offset += size;
    }
    if !watched_dest && offset >= len {
        return 0;
    }
    let mut ev = HoldEvent::default();
    fill_event(&mut ev, &cur, HoldKind::Connect, 0, origin);
    ev.flags |= flags::REFUSED | flags::INDIRECT | flags::SCTP_CONNECTX;
    ev.protocol = unsafe { read_at::<u16>(sk, off!(sock_protocol)) }.unwrap_or(132);
    count(Counter::RefusedIndirect);
    report_refusal(&ev);
    -EACCES
}

// --- keeping the hold ---------------------------------------------------------------------

#[fexit(function = "get_signal")]
pub fn restop(_ctx: FExitContext) -> i32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if unsafe { HELD.get(tid) }.is_some() {
        // Woken, but not by the agent (which un-holds before it resumes): stop again before
        // anything of the held action runs.
        count(Counter::Restopped);
        if !signal_self(SIGSTOP) {
            count(Counter::SignalFailed);
            kill_self();
        }
    }
    0
}

/// Whether `task` (a thread) is held and the caller is not the agent.
#[inline(always)]
fn held_and_not_agent(task: *const u8) -> bool {
    let Ok(target) = (unsafe { read_at::<u32>(task, off!(task_pid)) }) else {
        return false;
    };
    if unsafe { HELD.get(target) }.is_none() {
        return false;
    }
    match config() {
        Some(cfg) => !is_agent(&current(), cfg),
        None => true,
    }
}

#[lsm(hook = "task_kill")]
pub fn signal_guard(ctx: LsmContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    let sig: i32 = ctx.arg(2);
    if sig == SIGCONT && held_and_not_agent(task) {
        count(Counter::BlockedSignal);
        return -EPERM;
    }
    0
}

#[lsm(hook = "file_send_sigiotask")]
pub fn sigio_guard(ctx: LsmContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    let sig: i32 = ctx.arg(2);
    if sig == SIGCONT && held_and_not_agent(task) {
        count(Counter::BlockedSignal);
        return -EPERM;
    }
    0
}

#[lsm(hook = "ptrace_access_check")]
pub fn ptrace_guard(ctx: LsmContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    let mode: u32 = ctx.arg(1);
    if mode & PTRACE_MODE_ATTACH != 0 && held_and_not_agent(task) {
        count(Counter::BlockedPtrace);
        return -EPERM;
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
