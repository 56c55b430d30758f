//! Airlock's kernel side: BPF LSM programs that hold the exec and connect calls of watched tasks
//! until the agent decides, and keep anyone but the agent from releasing or tampering with them.
//!
//! - `task_fork` / `task_exit` (tp_btf): the watch mark is inherited at fork, so descendants stay
//!   watched across setuid, sudo and su.
//! - `exec_hold` (lsm/bprm_committed_creds): the new image is in place and has not run; a matching
//!   exec is stopped with SIGSTOP. The agent resumes it with SIGCONT or kills it.
//! - `connect_hold` (lsm/socket_connect): returns -ERESTARTNOINTR with SIGSTOP; after SIGCONT the
//!   call restarts and consumes the one-shot verdict the agent wrote for this thread and destination.
//! - `signal_guard` (lsm/task_kill), `ptrace_guard` (lsm/ptrace_access_check): only the agent may
//!   SIGCONT or attach to a held task.
#![no_std]
#![no_main]

use agent_common::{
    Config, Counter, FileKey, HoldEvent, HoldKind, KernelOffsets, VerdictKey, ERESTARTNOINTR,
    VERDICT_ALLOW,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::bpf_send_signal,
    },
    macros::{btf_tracepoint, lsm, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, LsmContext},
};

const SIGKILL: u32 = 9;
const SIGSTOP: u32 = 19;
const SIGCONT: i32 = 18;
const EPERM: i32 = 1;
const EACCES: i32 = 13;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const PTRACE_MODE_ATTACH: u32 = 0x02;

/// Field offsets of the running kernel, set by the agent at load time from its BTF.
#[no_mangle]
static AIRLOCK_OFFSETS: KernelOffsets = KernelOffsets {
    binprm_file: 0,
    file_inode: 0,
    inode_ino: 0,
    inode_sb: 0,
    sb_dev: 0,
    socket_type: 0,
    task_pid: 0,
    task_tgid: 0,
    task_exit_code: 0,
};

/// Not pinned: each agent reads its own ring. Holds published into an earlier agent's ring are
/// still in the pinned held map, which the agent sweeps.
#[map(name = "AIRLOCK_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
#[map(name = "AIRLOCK_HELD")]
static HELD: HashMap<u32, HoldEvent> = HashMap::pinned(8192, 0);
#[map(name = "AIRLOCK_WATCHED_TASKS")]
static WATCHED_TASKS: HashMap<u32, u8> = HashMap::pinned(65536, 0);
#[map(name = "AIRLOCK_WATCH_UIDS")]
static WATCH_UIDS: HashMap<u32, u8> = HashMap::pinned(1024, 0);
#[map(name = "AIRLOCK_WATCH_GIDS")]
static WATCH_GIDS: HashMap<u32, u8> = HashMap::pinned(1024, 0);
#[map(name = "AIRLOCK_WATCH_CGROUPS")]
static WATCH_CGROUPS: HashMap<u64, u8> = HashMap::pinned(1024, 0);
#[map(name = "AIRLOCK_EXEC_FILES")]
static EXEC_FILES: HashMap<FileKey, u64> = HashMap::pinned(4096, 0);
/// BPF_F_NO_PREALLOC is mandatory for LPM tries.
#[map(name = "AIRLOCK_CONNECT_NETS")]
static CONNECT_NETS: LpmTrie<[u8; 16], u64> = LpmTrie::pinned(4096, 1);
#[map(name = "AIRLOCK_CONNECT_PORTS")]
static CONNECT_PORTS: HashMap<u16, u64> = HashMap::pinned(4096, 0);
#[map(name = "AIRLOCK_VERDICTS")]
static VERDICTS: HashMap<VerdictKey, u32> = HashMap::pinned(8192, 0);
#[map(name = "AIRLOCK_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map(name = "AIRLOCK_EXITS")]
static EXITS: HashMap<u32, i32> = HashMap::pinned(8192, 0);
#[map(name = "AIRLOCK_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(agent_common::COUNTER_SLOTS, 0);

#[inline(always)]
fn offsets() -> KernelOffsets {
    // Volatile so the compiler keeps the load from .rodata that the loader patches.
    unsafe { core::ptr::read_volatile(&AIRLOCK_OFFSETS) }
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
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// Reads a kernel value at `base + off`.
#[inline(always)]
unsafe fn read_at<T>(base: *const u8, off: u64) -> Result<T, i32> {
    bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T)
}

/// Whether the current task is watched: marked (inherited), or by uid, gid or cgroup.
#[inline(always)]
fn current_is_watched(tgid: u32) -> bool {
    if unsafe { WATCHED_TASKS.get(tgid) }.is_some() {
        return true;
    }
    let ids = bpf_get_current_uid_gid();
    let uid = ids as u32;
    let gid = (ids >> 32) as u32;
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let watched = unsafe {
        WATCH_UIDS.get(uid).is_some()
            || WATCH_GIDS.get(gid).is_some()
            || WATCH_CGROUPS.get(cgroup).is_some()
    };
    if watched {
        // Mark it, so the watch survives a later setuid in this very process.
        let _ = WATCHED_TASKS.insert(tgid, 1, 0);
    }
    watched
}

/// Whether the agent is alive (recent heartbeat). When it is not, holds fail closed.
#[inline(always)]
fn agent_alive(cfg: &Config) -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    cfg.agent_tgid != 0 && now.saturating_sub(cfg.heartbeat_ns) <= cfg.heartbeat_timeout_ns
}

/// Fills the common part of a hold event for the current task.
#[inline(always)]
fn fill_common(ev: &mut HoldEvent, kind: HoldKind, rule_mask: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let ids = bpf_get_current_uid_gid();
    ev.kind = kind as u32;
    ev.tgid = (pid_tgid >> 32) as u32;
    ev.tid = pid_tgid as u32;
    ev.uid = ids as u32;
    ev.gid = (ids >> 32) as u32;
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    ev.hold_ns = unsafe { bpf_ktime_get_ns() };
    ev.rule_mask = rule_mask;
    ev.comm = bpf_get_current_comm().unwrap_or_default();
}

/// Publishes `ev` to the agent and records the hold. Returns false when the event could not be
/// delivered; the caller then fails closed.
#[inline(always)]
fn publish(ev: &HoldEvent) -> bool {
    let Some(mut slot) = EVENTS.reserve::<HoldEvent>(0) else {
        count(Counter::DropRingFull);
        return false;
    };
    if HELD.insert(ev.tgid, ev, 0).is_err() {
        slot.discard(0);
        count(Counter::DropRingFull);
        return false;
    }
    slot.write(*ev);
    slot.submit(0);
    true
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn task_fork(ctx: BtfTracePointContext) -> i32 {
    let parent = current_tgid();
    if !current_is_watched(parent) {
        return 0;
    }
    let child: *const u8 = ctx.arg(1);
    let off = offsets();
    // A new thread shares its parent's tgid, which is marked already; a new process gets its own.
    if let Ok(child_tgid) = unsafe { read_at::<u32>(child, off.task_tgid) } {
        let _ = WATCHED_TASKS.insert(child_tgid, 1, 0);
    }
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn task_exit(ctx: BtfTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // Only when the whole process goes (its leader thread exits).
    if tgid != pid_tgid as u32 {
        return 0;
    }
    let _ = WATCHED_TASKS.remove(tgid);
    let _ = HELD.remove(tgid);
    if let Some(slot) = EXITS.get_ptr_mut(tgid) {
        let task: *const u8 = ctx.arg(0);
        if let Ok(code) = unsafe { read_at::<i32>(task, offsets().task_exit_code) } {
            unsafe { *slot = code };
        }
    }
    0
}

#[lsm(hook = "bprm_committed_creds")]
pub fn exec_hold(ctx: LsmContext) -> i32 {
    let tgid = current_tgid();
    if !current_is_watched(tgid) {
        return 0;
    }
    let Some(cfg) = config() else { return 0 };
    let off = offsets();
    let bprm: *const u8 = ctx.arg(0);
    let key = unsafe {
        let Ok(file) = read_at::<*const u8>(bprm, off.binprm_file) else {
            return 0;
        };
        let Ok(inode) = read_at::<*const u8>(file, off.file_inode) else {
            return 0;
        };
        let Ok(ino) = read_at::<u64>(inode, off.inode_ino) else {
            return 0;
        };
        let Ok(sb) = read_at::<*const u8>(inode, off.inode_sb) else {
            return 0;
        };
        let Ok(dev) = read_at::<u32>(sb, off.sb_dev) else {
            return 0;
        };
        FileKey { ino, dev, pad: 0 }
    };
    let rule_mask = match unsafe { EXEC_FILES.get(key) } {
        Some(mask) => *mask,
        None if cfg.hold_all_execs != 0 => 0,
        None => {
            count(Counter::Pass);
            return 0;
        }
    };
    // Another attached copy of this program (during an agent upgrade) already holds it.
    if unsafe { HELD.get(tgid) }.is_some() {
        return 0;
    }
    if !agent_alive(cfg) {
        count(Counter::DropNoAgent);
        unsafe { bpf_send_signal(SIGKILL) };
        return 0;
    }
    let mut ev = HoldEvent::default();
    fill_common(&mut ev, HoldKind::Exec, rule_mask);
    ev.ino = key.ino;
    ev.dev = key.dev;
    if !publish(&ev) {
        unsafe { bpf_send_signal(SIGKILL) };
        return 0;
    }
    count(Counter::HoldExec);
    unsafe { bpf_send_signal(SIGSTOP) };
    0
}

#[lsm(hook = "socket_connect")]
pub fn connect_hold(ctx: LsmContext) -> i32 {
    let sock: *const u8 = ctx.arg(0);
    let addr: *const u8 = ctx.arg(1);
    let addrlen: i32 = ctx.arg(2);
    let Ok(family) = (unsafe { read_at::<u16>(addr, 0) }) else {
        return 0;
    };
    if family != AF_INET && family != AF_INET6 {
        return 0;
    }
    let tgid = current_tgid();
    if !current_is_watched(tgid) {
        return 0;
    }
    let off = offsets();
    let sock_type = match unsafe { read_at::<i16>(sock, off.socket_type) } {
        Ok(t) => t as u32,
        Err(_) => return 0,
    };
    if sock_type != SOCK_STREAM && sock_type != SOCK_DGRAM {
        return 0;
    }
    let mut ip = [0u8; 16];
    let port = match unsafe { read_at::<u16>(addr, 2) } {
        Ok(p) => u16::from_be(p),
        Err(_) => return 0,
    };
    if family == AF_INET {
        if addrlen < 8 {
            return 0;
        }
        let Ok(v4) = (unsafe { read_at::<[u8; 4]>(addr, 4) }) else {
            return 0;
        };
        ip[10] = 0xff;
        ip[11] = 0xff;
        ip[12..16].copy_from_slice(&v4);
    } else {
        if addrlen < 24 {
            return 0;
        }
        let Ok(v6) = (unsafe { read_at::<[u8; 16]>(addr, 8) }) else {
            return 0;
        };
        ip = v6;
    }
    let Some(cfg) = config() else { return 0 };
    let Some(net_mask) = CONNECT_NETS.get(Key::new(128, ip)) else {
        return 0;
    };
    let port_mask = unsafe { CONNECT_PORTS.get(port) }.copied().unwrap_or(0) | cfg.any_port_mask;
    let rule_mask = *net_mask & port_mask;
    if rule_mask == 0 {
        count(Counter::Pass);
        return 0;
    }
    let vkey = VerdictKey {
        tid: bpf_get_current_pid_tgid() as u32,
        port,
        family,
        addr: ip,
    };
    if let Some(verdict) = unsafe { VERDICTS.get(vkey) }.copied() {
        // One shot: the approval covers this call only.
        let _ = VERDICTS.remove(vkey);
        if verdict == VERDICT_ALLOW {
            count(Counter::VerdictAllow);
            return 0;
        }
        count(Counter::VerdictDeny);
        return -EACCES;
    }
    if unsafe { HELD.get(tgid) }.is_some() {
        return ERESTARTNOINTR;
    }
    if !agent_alive(cfg) {
        count(Counter::DropNoAgent);
        return -EACCES;
    }
    let mut ev = HoldEvent::default();
    fill_common(&mut ev, HoldKind::Connect, rule_mask);
    ev.family = family;
    ev.port = port;
    ev.addr = ip;
    ev.sock_type = sock_type;
    if !publish(&ev) {
        return -EACCES;
    }
    count(Counter::HoldConnect);
    unsafe { bpf_send_signal(SIGSTOP) };
    ERESTARTNOINTR
}

/// Whether `task` is held and the caller is not the agent.
#[inline(always)]
fn held_and_not_agent(task: *const u8) -> bool {
    let Ok(target) = (unsafe { read_at::<u32>(task, offsets().task_tgid) }) else {
        return false;
    };
    if unsafe { HELD.get(target) }.is_none() {
        return false;
    }
    let agent = config().map(|c| c.agent_tgid).unwrap_or(0);
    current_tgid() != agent
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
