//! Types shared by Airlock's kernel programs (crate agent-ebpf) and the agent (crate agent-user).
//!
//! Everything here is `#[repr(C)]` plain data: it crosses the kernel boundary as map keys, map
//! values and ring-buffer records, so both sides must agree on its layout byte for byte.
#![no_std]

/// Version of the pinned state's layout (maps, their keys and values). Pins live under
/// `<bpffs dir>/v<LAYOUT>`, so that an agent with another layout never reads them wrongly.
pub const LAYOUT: u32 = 3;

/// Names of the maps, pinned under the agent's bpffs directory so that holds and marks outlive
/// an agent restart (or crash) and the next agent finds them.
pub mod maps {
    /// Ring buffer of [`HoldEvent`](super::HoldEvent) records, kernel to agent.
    pub const EVENTS: &str = "AIRLOCK_EVENTS";
    /// `HashMap<u32 tid, HoldEvent>`: threads held right now.
    pub const HELD: &str = "AIRLOCK_HELD";
    /// `HashMap<u64 task_struct address, u32 uid>`: tasks marked as watched, with the uid the
    /// watch began with (inherited at fork by every new task, thread or process, of a watched
    /// task; removed when the task is freed).
    pub const WATCHED_TASKS: &str = "AIRLOCK_WATCHED_TASKS";
    /// `HashMap<u32 uid, u8>`.
    pub const WATCH_UIDS: &str = "AIRLOCK_WATCH_UIDS";
    /// `HashMap<u32 gid, u8>`.
    pub const WATCH_GIDS: &str = "AIRLOCK_WATCH_GIDS";
    /// `HashMap<u64 cgroup id, u8>`.
    pub const WATCH_CGROUPS: &str = "AIRLOCK_WATCH_CGROUPS";
    /// `HashMap<CgroupPath, u8>`: watched cgroup paths; a cgroup created at one of them (a
    /// unit restarted by systemd) is watched from its creation on.
    pub const WATCH_CGROUP_PATHS: &str = "AIRLOCK_WATCH_CGROUP_PATHS";
    /// `HashMap<FileKey, u64 rule mask>`: binaries whose exec is held.
    pub const EXEC_FILES: &str = "AIRLOCK_EXEC_FILES";
    /// `HashMap<FileKey, FileStamp>`: files the account could have made that the agent has
    /// hashed and found to be no copy of a held binary, as they were then (change time).
    pub const CLEARED_FILES: &str = "AIRLOCK_CLEARED_FILES";
    /// `HashMap<u64 task_struct address, ExecStart>`: the file an exec in progress named, kept
    /// from the first binary-format check to the commit (scripts).
    pub const EXEC_STARTS: &str = "AIRLOCK_EXEC_STARTS";
    /// `LpmTrie<[u8; 16], u64 rule mask>`: watched destination prefixes (IPv4 as mapped IPv6).
    pub const CONNECT_NETS: &str = "AIRLOCK_CONNECT_NETS";
    /// `HashMap<u16 port, u64 rule mask>`: watched destination ports.
    pub const CONNECT_PORTS: &str = "AIRLOCK_CONNECT_PORTS";
    /// `LruHashMap<VerdictKey, Verdict>`: verdicts the agent wrote for held connects, sends and
    /// executable mappings, consumed or kept as the verdict says.
    pub const VERDICTS: &str = "AIRLOCK_VERDICTS";
    /// `Array<Config>` with one element.
    pub const CONFIG: &str = "AIRLOCK_CONFIG";
    /// `PerCpuArray<u64>` indexed by [`Counter`](super::Counter).
    pub const COUNTERS: &str = "AIRLOCK_COUNTERS";
    /// `LruHashMap<u32 tgid, i32>`: released execs whose exit status the agent awaits; the
    /// kernel writes the wait status there when the process exits.
    pub const EXITS: &str = "AIRLOCK_EXITS";
    /// `LruHashMap<u32 tgid, u64 ns>`: when a process's last refusal was reported (refusals
    /// are reported at most once a second per process, so none can flood the ring).
    pub const REPORTED: &str = "AIRLOCK_REPORTED";
}

/// Name of the read-only global holding [`KernelOffsets`], set by the agent at load time.
pub const OFFSETS_GLOBAL: &str = "AIRLOCK_OFFSETS";

/// What a held task was doing.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldKind {
    /// An `execve`, held after the new image is committed and before it runs.
    Exec = 1,
    /// A `connect` on an IPv4 or IPv6 socket, held before any packet leaves.
    Connect = 2,
    /// A send with a destination address (unconnected UDP, TCP Fast Open), held before any
    /// packet leaves.
    Send = 3,
    /// An executable mapping of a held binary by a running process (a dynamic loader running
    /// it as `ld.so /usr/bin/kubectl`), held before the mapping exists.
    Map = 4,
}

impl HoldKind {
    /// The kind of a raw `kind` field.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Exec),
            2 => Some(Self::Connect),
            3 => Some(Self::Send),
            4 => Some(Self::Map),
            _ => None,
        }
    }
}

/// Bits of [`HoldEvent::flags`].
pub mod flags {
    /// The kernel already refused the action (the task was killed, or the call failed with
    /// EACCES) and holds nothing: the event is a report, not a hold.
    pub const REFUSED: u32 = 1 << 0;
    /// The task was being traced: a tracer could change what runs, so an exec is refused.
    pub const TRACED: u32 = 1 << 1;
    /// The call came from io_uring (or another path that cannot be restarted after a stop), so
    /// it was refused rather than held.
    pub const INDIRECT: u32 = 1 << 2;
    /// The exec named a script: [`HoldEvent::named`] is the script, [`HoldEvent::file`] its
    /// interpreter.
    pub const SCRIPT: u32 = 1 << 3;
    /// The executed (or named) file is one the account could have made: owned by it, or
    /// writable by it. The agent hashes it to find copies of held binaries.
    pub const SELF_MADE: u32 = 1 << 4;
    /// A send with MSG_FASTOPEN or on an unconnected stream socket (TCP Fast Open).
    pub const FASTOPEN: u32 = 1 << 5;
    /// The connect came through SCTP's connectx (several addresses), which cannot be held.
    pub const SCTP_CONNECTX: u32 = 1 << 6;
}

/// Most intermediate interpreters an exec records (a script run by a script run by ...).
pub const MIDDLE_LEVELS: usize = 3;

/// Identifies a file by kernel device number and inode, so every path to a binary matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileKey {
    /// Inode number.
    pub ino: u64,
    /// Kernel device number (`MAJOR << 20 | MINOR`) of the file's super block.
    pub dev: u32,
    /// Always zero; keeps the key free of uninitialised padding.
    pub pad: u32,
}

/// A file's change time as the kernel keeps it: any write or attribute change moves it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileStamp {
    /// Seconds.
    pub sec: i64,
    /// Nanoseconds.
    pub nsec: u64,
}

/// One held action, as the kernel saw it. Written to the ring buffer and kept in the held map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HoldEvent {
    /// [`HoldKind`] as u32.
    pub kind: u32,
    /// [`flags`] bits.
    pub flags: u32,
    /// Process id (thread group id) of the held task.
    pub tgid: u32,
    /// Thread id that made the call (the held thread).
    pub tid: u32,
    /// Real uid of the task at the time of the call.
    pub uid: u32,
    /// Real gid of the task at the time of the call.
    pub gid: u32,
    /// cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()` when the hold began (CLOCK_MONOTONIC); with `tid`, names the hold.
    pub hold_ns: u64,
    /// Start time of the process (`task_struct::start_time` of its leader, CLOCK_MONOTONIC):
    /// with `tgid`, names the process across pid reuse.
    pub start_ns: u64,
    /// Exec: the program the kernel runs (for a script: its interpreter). Map: the mapped file.
    pub file: FileKey,
    /// Exec of a script: the script file the exec named.
    pub named: FileKey,
    /// Change time of the self-made file ([`flags::SELF_MADE`]): the named one if that is
    /// self-made, else the executed one.
    pub stamp: FileStamp,
    /// Exec of a script run by a chain of interpreters: the files between the named one and
    /// the one that runs (zero keys where there are fewer).
    pub middle: [FileKey; MIDDLE_LEVELS],
    /// Exec of a script: the argument count the exec was called with (its arguments are the
    /// last `argc - 1` of the interpreter's command line).
    pub argc: u32,
    /// Connect and send: socket type (1 = stream, 2 = datagram).
    pub sock_type: u16,
    /// Connect and send: IP protocol (6 = TCP, 17 = UDP, 1 = ICMP, ...).
    pub protocol: u16,
    /// Connect and send: the socket (kernel address), with `sock_ino` naming it for verdicts.
    pub sock: u64,
    /// Connect and send: inode number of the socket.
    pub sock_ino: u64,
    /// Connect and send: address family (2 = AF_INET, 10 = AF_INET6).
    pub family: u16,
    /// Connect and send: destination port, host byte order.
    pub port: u16,
    /// The uid the watch began with (the account whose task started this chain, before any
    /// setuid, sudo or su).
    pub origin_uid: u32,
    /// Connect and send: destination address as IPv6 (IPv4 mapped as `::ffff:a.b.c.d`).
    pub addr: [u8; 16],
    /// Rules (bit per rule) whose kernel prefilter matched.
    pub rule_mask: u64,
    /// `comm` of the task.
    pub comm: [u8; 16],
}

/// Key of a verdict: what the agent allowed or refused. For connects and sends, this socket to
/// this destination over this protocol; for executable mappings, this process and file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    /// [`HoldKind`] of the hold it answers (Connect and Send share [`HoldKind::Connect`]).
    pub kind: u32,
    /// Map: the process id.
    pub tgid: u32,
    /// Connect and send: the socket's kernel address. Map: the process start time.
    pub obj: u64,
    /// Connect and send: the socket's inode number. Map: the file's inode number.
    pub ino: u64,
    /// Map: the file's device number.
    pub dev: u32,
    /// Connect and send: destination port.
    pub port: u16,
    /// Connect and send: address family.
    pub family: u16,
    /// Connect and send: IP protocol.
    pub protocol: u16,
    /// Always zero.
    pub pad: [u16; 3],
    /// Connect and send: destination (IPv6, IPv4 mapped).
    pub addr: [u8; 16],
}

/// A verdict the agent wrote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// [`VERDICT_ALLOW`] or [`VERDICT_DENY`].
    pub verdict: u32,
    /// Non-zero: the verdict stands for the life of its key (a datagram socket may send to an
    /// allowed destination again; a process may map an allowed file again). Zero: used once.
    pub standing: u32,
    /// `bpf_ktime_get_ns()` after which the verdict is void (0: never).
    pub expires_ns: u64,
}

/// The files an exec in progress went through, recorded from its start to its commit: the one
/// it named (a script), and the interpreters in between.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExecStart {
    /// The exec (`struct linux_binprm` address), so a record of another exec is ignored.
    pub bprm: u64,
    /// The named file.
    pub file: FileKey,
    /// The interpreters between the named file and the one that runs.
    pub middle: [FileKey; MIDDLE_LEVELS],
    /// How many of `middle` are set.
    pub levels: u32,
    /// The argument count the exec was called with.
    pub argc: u32,
    /// Change time of the first self-made file among them.
    pub stamp: FileStamp,
    /// Rules naming any of them.
    pub rule_mask: u64,
    /// Whether the account could have made one of them ([`flags::SELF_MADE`]).
    pub self_made: u32,
    /// Always zero.
    pub pad: u32,
}

/// A cgroup path relative to the cgroup v2 root (`/system.slice/ci.service`), NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CgroupPath {
    /// The path's bytes, NUL-padded.
    pub bytes: [u8; CGROUP_PATH_LEN],
}

/// Longest cgroup path the kernel side recognises by name.
pub const CGROUP_PATH_LEN: usize = 128;

/// Value of an [`maps::EXITS`] entry before the process has exited.
pub const EXIT_PENDING: i32 = i32::MIN;

/// Verdict values.
pub const VERDICT_ALLOW: u32 = 1;
/// The call fails with `EACCES`.
pub const VERDICT_DENY: u32 = 2;

/// Run-time settings the agent writes into the config map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// tgid of the running agent: never watched, and the only sender allowed to SIGCONT or
    /// ptrace a held task, while its heartbeat is fresh and its start time matches (a process
    /// that reuses the pid of an agent that is gone is nobody). 0 when no agent runs.
    pub agent_tgid: u32,
    /// Non-zero: hold every exec of a watched task, not just the listed binaries.
    pub hold_all_execs: u32,
    /// Last heartbeat of the agent, `bpf_ktime_get_ns()` clock.
    pub heartbeat_ns: u64,
    /// A heartbeat older than this means the agent is gone: fail closed instead of holding.
    pub heartbeat_timeout_ns: u64,
    /// Rules (bit per rule) that watch every port of their destination prefixes.
    pub any_port_mask: u64,
    /// Non-zero: hold execs of files the account could have made (to find copies of held
    /// binaries, and for `@self-made` rules).
    pub hold_self_made: u32,
    /// Non-zero: some gid is watched, so supplementary groups are checked too.
    pub watch_groups: u32,
    /// Start time of the agent's process (`task_struct::start_boottime`, ns), to within a
    /// clock tick.
    pub agent_start_ns: u64,
}

/// Byte offsets of the kernel struct fields the programs read, resolved by the agent from the
/// running kernel's BTF (a user-space stand-in for CO-RE relocations).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOffsets {
    /// `struct linux_binprm::file`.
    pub binprm_file: u64,
    /// `struct linux_binprm::argc`.
    pub binprm_argc: u64,
    /// `struct file::f_inode`.
    pub file_inode: u64,
    /// `struct inode::i_ino`.
    pub inode_ino: u64,
    /// `struct inode::i_sb`.
    pub inode_sb: u64,
    /// `struct inode::i_mode`.
    pub inode_mode: u64,
    /// `struct inode::i_uid`.
    pub inode_uid: u64,
    /// `struct inode::i_gid`.
    pub inode_gid: u64,
    /// The inode's change time, seconds (`i_ctime_sec`, or `tv_sec` of `__i_ctime`/`i_ctime`).
    pub inode_ctime_sec: u64,
    /// The inode's change time, nanoseconds.
    pub inode_ctime_nsec: u64,
    /// Size of the nanoseconds field (4 or 8 bytes).
    pub inode_ctime_nsec_size: u64,
    /// `struct super_block::s_dev`.
    pub sb_dev: u64,
    /// `struct socket::state`.
    pub socket_state: u64,
    /// `struct socket::type`.
    pub socket_type: u64,
    /// `struct socket::sk`.
    pub socket_sk: u64,
    /// `struct socket_alloc::vfs_inode` (the socket's inode follows the socket).
    pub socket_alloc_inode: u64,
    /// `struct sock::sk_protocol`.
    pub sock_protocol: u64,
    /// `struct msghdr::msg_name`.
    pub msghdr_name: u64,
    /// `struct msghdr::msg_namelen`.
    pub msghdr_namelen: u64,
    /// `struct vm_area_struct::vm_file`.
    pub vma_file: u64,
    /// `struct task_struct::pid`.
    pub task_pid: u64,
    /// `struct task_struct::tgid`.
    pub task_tgid: u64,
    /// `struct task_struct::exit_code`.
    pub task_exit_code: u64,
    /// `struct task_struct::ptrace`.
    pub task_ptrace: u64,
    /// `struct task_struct::flags`.
    pub task_flags: u64,
    /// `struct task_struct::signal`.
    pub task_signal: u64,
    /// `struct task_struct::group_leader`.
    pub task_group_leader: u64,
    /// `struct task_struct::start_time`.
    pub task_start_time: u64,
    /// `struct task_struct::start_boottime`.
    pub task_start_boottime: u64,
    /// `struct task_struct::cred`.
    pub task_cred: u64,
    /// `struct cred::group_info`.
    pub cred_group_info: u64,
    /// `struct group_info::ngroups`.
    pub group_info_ngroups: u64,
    /// `struct group_info::gid`.
    pub group_info_gid: u64,
    /// `struct super_block::s_magic`.
    pub sb_magic: u64,
    /// `struct super_block::s_user_ns`.
    pub sb_user_ns: u64,
    /// `struct user_namespace::level`.
    pub user_ns_level: u64,
    /// `struct sock_common::skc_family` (the start of `struct sock`).
    pub sock_family: u64,
    /// `struct task_struct::mm`.
    pub task_mm: u64,
    /// `struct mm_struct::exe_file`.
    pub mm_exe_file: u64,
    /// `struct signal_struct::live`.
    pub signal_live: u64,
    /// `struct pt_regs::orig_ax`: the system call being made.
    pub regs_orig_ax: u64,
    /// `struct cgroup::kn`.
    pub cgroup_kn: u64,
    /// `struct kernfs_node::id`.
    pub kernfs_id: u64,
    /// `struct kernfs_node::parent` (`__parent` on newer kernels).
    pub kernfs_parent: u64,
    /// Index of the `prot` argument of the `mmap_file` LSM hook (2 while the hook also takes
    /// `reqprot`, else 1).
    pub mmap_prot_arg: u64,
    /// Index of the `prot` argument of the `file_mprotect` LSM hook.
    pub mprotect_prot_arg: u64,
}

/// Per-CPU counters, summed by the agent.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Execs held.
    HoldExec = 0,
    /// Connects held.
    HoldConnect = 1,
    /// Execs by watched tasks that no rule holds. (Connects and sends to destinations no rule
    /// names leave before the watch is looked up, uncounted: most of a host's traffic.)
    Pass = 2,
    /// Holds refused because the ring buffer was full (failed closed).
    DropRingFull = 3,
    /// Holds refused because the agent's heartbeat was stale (failed closed).
    DropNoAgent = 4,
    /// Verdicts used: allowed.
    VerdictAllow = 5,
    /// Verdicts used: denied.
    VerdictDeny = 6,
    /// SIGCONT to a held task refused (kill(2) or the SIGIO path).
    BlockedSignal = 7,
    /// ptrace access to a held task refused.
    BlockedPtrace = 8,
    /// Sends with a destination held (unconnected UDP, TCP Fast Open).
    HoldSend = 9,
    /// Executable mappings held (a loader running a held binary).
    HoldMap = 10,
    /// A held task woken by someone else (the kernel's job control, a tracer) and stopped
    /// again before it could run.
    Restopped = 11,
    /// Execs of traced tasks refused.
    RefusedTraced = 12,
    /// io_uring (or other indirect) connects and sends to watched destinations refused.
    RefusedIndirect = 13,
    /// Forks of watched tasks refused because the mark table was full (failed closed).
    RefusedFork = 14,
    /// The stop or kill signal could not be sent (the call was refused instead).
    SignalFailed = 15,
    /// Refusal reports left out because the same process was reported less than a second ago.
    ReportsSkipped = 16,
}

/// Number of [`Counter`] slots.
pub const COUNTER_SLOTS: u32 = 17;

/// `-ERESTARTNOINTR`: the syscall is restarted transparently after the stop.
pub const ERESTARTNOINTR: i32 = -513;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C) plain data with explicit padding fields or none.
    unsafe impl aya::Pod for super::HoldEvent {}
    unsafe impl aya::Pod for super::FileKey {}
    unsafe impl aya::Pod for super::FileStamp {}
    unsafe impl aya::Pod for super::VerdictKey {}
    unsafe impl aya::Pod for super::Verdict {}
    unsafe impl aya::Pod for super::ExecStart {}
    unsafe impl aya::Pod for super::CgroupPath {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::KernelOffsets {}
}
