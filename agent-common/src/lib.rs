//! Types shared by Airlock's kernel programs (crate agent-ebpf) and the agent (crate agent-user).
//!
//! Everything here is `#[repr(C)]` plain data: it crosses the kernel boundary as map keys, map
//! values and ring-buffer records, so both sides must agree on its layout byte for byte.
#![no_std]

/// Names of the maps, pinned under the agent's bpffs directory so that holds outlive an agent
/// crash and the restarted agent finds them.
pub mod maps {
    /// Ring buffer of [`HoldEvent`](super::HoldEvent) records, kernel to agent.
    pub const EVENTS: &str = "AIRLOCK_EVENTS";
    /// `HashMap<u32 tgid, HoldEvent>`: tasks held right now.
    pub const HELD: &str = "AIRLOCK_HELD";
    /// `HashMap<u32 tgid, u8>`: tasks marked as watched (inherited at fork).
    pub const WATCHED_TASKS: &str = "AIRLOCK_WATCHED_TASKS";
    /// `HashMap<u32 uid, u8>`.
    pub const WATCH_UIDS: &str = "AIRLOCK_WATCH_UIDS";
    /// `HashMap<u32 gid, u8>`.
    pub const WATCH_GIDS: &str = "AIRLOCK_WATCH_GIDS";
    /// `HashMap<u64 cgroup id, u8>`.
    pub const WATCH_CGROUPS: &str = "AIRLOCK_WATCH_CGROUPS";
    /// `HashMap<FileKey, u64 rule mask>`: binaries whose exec is held.
    pub const EXEC_FILES: &str = "AIRLOCK_EXEC_FILES";
    /// `LpmTrie<[u8; 16], u64 rule mask>`: watched destination prefixes (IPv4 as mapped IPv6).
    pub const CONNECT_NETS: &str = "AIRLOCK_CONNECT_NETS";
    /// `HashMap<u16 port, u64 rule mask>`: watched destination ports.
    pub const CONNECT_PORTS: &str = "AIRLOCK_CONNECT_PORTS";
    /// `HashMap<VerdictKey, u32>`: one-shot connect verdicts written by the agent.
    pub const VERDICTS: &str = "AIRLOCK_VERDICTS";
    /// `Array<Config>` with one element.
    pub const CONFIG: &str = "AIRLOCK_CONFIG";
    /// `PerCpuArray<u64>` indexed by [`Counter`](super::Counter).
    pub const COUNTERS: &str = "AIRLOCK_COUNTERS";
    /// `HashMap<u32 tgid, i32>`: released execs whose exit status the agent awaits; the kernel
    /// writes the wait status there when the process exits.
    pub const EXITS: &str = "AIRLOCK_EXITS";
}

/// Name of the read-only global holding [`KernelOffsets`], set by the agent at load time.
pub const OFFSETS_GLOBAL: &str = "AIRLOCK_OFFSETS";

/// What a held task was doing.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldKind {
    /// An `execve`, held after the new image is committed and before it runs.
    Exec = 1,
    /// A `connect` on an IPv4 or IPv6 TCP/UDP socket, held before any packet leaves.
    Connect = 2,
}

/// One held action, as the kernel saw it. Written to the ring buffer and kept in the held map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HoldEvent {
    /// [`HoldKind`] as u32.
    pub kind: u32,
    /// Process id (thread group id) of the held task.
    pub tgid: u32,
    /// Thread id that made the call (connect verdicts are bound to it).
    pub tid: u32,
    /// Real uid and gid of the task at the time of the call.
    pub uid: u32,
    /// Real gid of the task at the time of the call.
    pub gid: u32,
    /// For connect: the socket type (1 = stream/TCP, 2 = datagram/UDP).
    pub sock_type: u32,
    /// cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()` when the hold began (CLOCK_MONOTONIC).
    pub hold_ns: u64,
    /// For exec: inode number of the new program.
    pub ino: u64,
    /// For exec: kernel device number (`MAJOR << 20 | MINOR`) of the new program's file system.
    pub dev: u32,
    /// For connect: address family (2 = AF_INET, 10 = AF_INET6).
    pub family: u16,
    /// For connect: destination port, host byte order.
    pub port: u16,
    /// For connect: destination address as IPv6 (IPv4 mapped as `::ffff:a.b.c.d`).
    pub addr: [u8; 16],
    /// Rules (bit per rule) whose kernel prefilter matched.
    pub rule_mask: u64,
    /// `comm` of the task.
    pub comm: [u8; 16],
}

/// Identifies a file by kernel device number and inode, so every path to a binary matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileKey {
    /// Inode number.
    pub ino: u64,
    /// Kernel device number (`MAJOR << 20 | MINOR`).
    pub dev: u32,
    /// Always zero; keeps the key free of uninitialised padding.
    pub pad: u32,
}

/// Key of a one-shot connect verdict: only this thread, to this destination, may pass once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    /// Thread id that made the held connect.
    pub tid: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// Address family of the call.
    pub family: u16,
    /// Destination address as IPv6 (IPv4 mapped).
    pub addr: [u8; 16],
}

/// Value of an [`maps::EXITS`] entry before the process has exited.
pub const EXIT_PENDING: i32 = i32::MIN;

/// Verdict values in the verdict map.
pub const VERDICT_ALLOW: u32 = 1;
/// The connect fails with `EACCES`.
pub const VERDICT_DENY: u32 = 2;

/// Run-time settings the agent writes into the config map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// tgid of the running agent: the only sender allowed to SIGCONT or ptrace a held task.
    pub agent_tgid: u32,
    /// Non-zero: hold every exec of a watched task, not just the listed binaries.
    pub hold_all_execs: u32,
    /// Last heartbeat of the agent, `bpf_ktime_get_ns()` clock.
    pub heartbeat_ns: u64,
    /// A heartbeat older than this means the agent is gone: fail closed instead of holding.
    pub heartbeat_timeout_ns: u64,
    /// Rules (bit per rule) that watch every port of their destination prefixes.
    pub any_port_mask: u64,
}

/// Byte offsets of the kernel struct fields the programs read, resolved by the agent from the
/// running kernel's BTF (a user-space stand-in for CO-RE relocations).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOffsets {
    /// `struct linux_binprm::file`.
    pub binprm_file: u64,
    /// `struct file::f_inode`.
    pub file_inode: u64,
    /// `struct inode::i_ino`.
    pub inode_ino: u64,
    /// `struct inode::i_sb`.
    pub inode_sb: u64,
    /// `struct super_block::s_dev`.
    pub sb_dev: u64,
    /// `struct socket::type`.
    pub socket_type: u64,
    /// `struct task_struct::pid`.
    pub task_pid: u64,
    /// `struct task_struct::tgid`.
    pub task_tgid: u64,
    /// `struct task_struct::exit_code`.
    pub task_exit_code: u64,
}

/// Per-CPU counters, summed by the agent.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Execs held.
    HoldExec = 0,
    /// Connects held.
    HoldConnect = 1,
    /// Calls by watched tasks that passed the prefilter without a hold.
    Pass = 2,
    /// Holds refused because the ring buffer was full (failed closed).
    DropRingFull = 3,
    /// Holds refused because the agent's heartbeat was stale (failed closed).
    DropNoAgent = 4,
    /// One-shot connect verdicts consumed: allowed.
    VerdictAllow = 5,
    /// One-shot connect verdicts consumed: denied.
    VerdictDeny = 6,
    /// SIGCONT to a held task refused.
    BlockedSignal = 7,
    /// ptrace access to a held task refused.
    BlockedPtrace = 8,
}

/// Number of [`Counter`] slots.
pub const COUNTER_SLOTS: u32 = 9;

/// `-ERESTARTNOINTR`: the syscall is restarted transparently after the stop.
pub const ERESTARTNOINTR: i32 = -513;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C) plain data with explicit padding fields or none.
    unsafe impl aya::Pod for super::HoldEvent {}
    unsafe impl aya::Pod for super::FileKey {}
    unsafe impl aya::Pod for super::VerdictKey {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::KernelOffsets {}
}
