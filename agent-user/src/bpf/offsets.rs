//! Kernel struct field offsets, read from the running kernel's BTF.
//!
//! aya's Rust eBPF side has no CO-RE relocations, so the programs read fields at offsets the
//! agent resolves here and passes in as a read-only global: the same object then runs on any
//! kernel with BTF, whatever its struct layouts.

use std::path::Path;

use agent_common::KernelOffsets;
use btf_rs::{Btf, Type};

/// Errors resolving offsets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OffsetError {
    /// No BTF for the running kernel.
    #[error(
        "cannot read kernel BTF at {path}: {reason}. The kernel must be built with \
         CONFIG_DEBUG_INFO_BTF=y (Debian, Ubuntu, Fedora and RHEL kernels are)"
    )]
    NoBtf {
        /// Path tried.
        path: String,
        /// Why it failed.
        reason: String,
    },
    /// A struct or field the programs need is missing.
    #[error("kernel BTF has no field {field} in struct {strukt}")]
    Missing {
        /// Struct name.
        strukt: &'static str,
        /// Field name.
        field: &'static str,
    },
}

/// Byte offset of `field` in `struct strukt`, searching anonymous nested structs and unions.
fn field_offset(btf: &Btf, strukt: &'static str, field: &'static str) -> Result<u64, OffsetError> {
    Ok(member(btf, strukt, field)?.0)
}

/// Offset and size in bytes of `field` in `struct strukt`.
fn member(btf: &Btf, strukt: &'static str, field: &'static str) -> Result<(u64, u64), OffsetError> {
    let missing = OffsetError::Missing { strukt, field };
    let types = btf
        .resolve_types_by_name(strukt)
        .map_err(|_| missing.clone())?;
    for t in types {
        if let Type::Struct(s) = t {
            if let Some((bits, size)) = find_member(btf, &s, field) {
                return Ok((u64::from(bits / 8), size));
            }
        }
    }
    Err(missing)
}

/// The offset of the first of `fields` that `struct strukt` has (fields renamed across kernel
/// versions). The error names the last one.
fn first_offset(
    btf: &Btf,
    strukt: &'static str,
    fields: &[&'static str],
) -> Result<u64, OffsetError> {
    let mut last = OffsetError::Missing { strukt, field: "" };
    for f in fields {
        match field_offset(btf, strukt, f) {
            Ok(off) => return Ok(off),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Bit offset and byte size of `field` in `s`.
fn find_member(btf: &Btf, s: &btf_rs::Struct, field: &str) -> Option<(u32, u64)> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == field {
            return Some((m.bit_offset(), type_size(btf, m)));
        }
        if name.is_empty() {
            // Anonymous struct or union: look inside, adding its own offset.
            if let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m) {
                if let Some((bits, size)) = find_member(btf, &inner, field) {
                    return Some((m.bit_offset() + bits, size));
                }
            }
        }
    }
    None
}

/// Size in bytes of the type of `m` (through typedefs and qualifiers); 0 if unknown.
fn type_size(btf: &Btf, m: &btf_rs::Member) -> u64 {
    let mut t = btf.resolve_chained_type(m);
    for _ in 0..8 {
        match t {
            Ok(Type::Int(i)) => return i.size() as u64,
            Ok(Type::Enum(e)) => return e.size() as u64,
            Ok(Type::Struct(s) | Type::Union(s)) => return s.size() as u64,
            Ok(Type::Ptr(_)) => return 8,
            Ok(Type::Typedef(ref x)) => t = btf.resolve_chained_type(x),
            Ok(Type::Volatile(ref x)) => t = btf.resolve_chained_type(x),
            Ok(Type::Const(ref x)) => t = btf.resolve_chained_type(x),
            _ => return 0,
        }
    }
    0
}

/// The index of the parameter named `param` of the kernel function `func` (the BPF LSM hook
/// `bpf_lsm_<hook>`), whose argument list has changed across kernel versions.
fn param_index(btf: &Btf, func: &'static str, param: &'static str) -> Result<u64, OffsetError> {
    let missing = OffsetError::Missing {
        strukt: func,
        field: param,
    };
    for t in btf
        .resolve_types_by_name(func)
        .map_err(|_| missing.clone())?
    {
        let Type::Func(f) = t else { continue };
        let Ok(Type::FuncProto(proto)) = btf.resolve_chained_type(&f) else {
            continue;
        };
        if let Some(i) = proto
            .parameters
            .iter()
            .position(|p| btf.resolve_name(p).is_ok_and(|n| n == param))
        {
            return Ok(i as u64);
        }
    }
    Err(missing)
}

/// The inode's change time: (seconds offset, nanoseconds offset, nanoseconds size). 6.11 and
/// later split it into `i_ctime_sec` and `i_ctime_nsec`; before, it is a `struct timespec64`
/// named `__i_ctime` (6.6) or `i_ctime`.
fn ctime(btf: &Btf) -> Result<(u64, u64, u64), OffsetError> {
    if let (Ok(sec), Ok((nsec, size))) = (
        field_offset(btf, "inode", "i_ctime_sec"),
        member(btf, "inode", "i_ctime_nsec"),
    ) {
        return Ok((sec, nsec, size));
    }
    let ts = first_offset(btf, "inode", &["__i_ctime", "i_ctime"])?;
    Ok((ts, ts + 8, 8))
}

/// Resolves every offset the programs use from the BTF file at `path`
/// (normally /sys/kernel/btf/vmlinux).
pub fn resolve(path: &Path) -> Result<KernelOffsets, OffsetError> {
    let btf = Btf::from_file(path).map_err(|e| OffsetError::NoBtf {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let (ctime_sec, ctime_nsec, ctime_nsec_size) = ctime(&btf)?;
    Ok(KernelOffsets {
        binprm_file: field_offset(&btf, "linux_binprm", "file")?,
        binprm_argc: field_offset(&btf, "linux_binprm", "argc")?,
        file_inode: field_offset(&btf, "file", "f_inode")?,
        inode_ino: field_offset(&btf, "inode", "i_ino")?,
        inode_sb: field_offset(&btf, "inode", "i_sb")?,
        inode_mode: field_offset(&btf, "inode", "i_mode")?,
        inode_uid: field_offset(&btf, "inode", "i_uid")?,
        inode_gid: field_offset(&btf, "inode", "i_gid")?,
        inode_ctime_sec: ctime_sec,
        inode_ctime_nsec: ctime_nsec,
        inode_ctime_nsec_size: ctime_nsec_size,
        sb_dev: field_offset(&btf, "super_block", "s_dev")?,
        socket_state: field_offset(&btf, "socket", "state")?,
        socket_type: field_offset(&btf, "socket", "type")?,
        socket_sk: field_offset(&btf, "socket", "sk")?,
        socket_alloc_inode: field_offset(&btf, "socket_alloc", "vfs_inode")?,
        sock_protocol: field_offset(&btf, "sock", "sk_protocol")?,
        msghdr_name: field_offset(&btf, "msghdr", "msg_name")?,
        msghdr_namelen: field_offset(&btf, "msghdr", "msg_namelen")?,
        vma_file: field_offset(&btf, "vm_area_struct", "vm_file")?,
        task_pid: field_offset(&btf, "task_struct", "pid")?,
        task_tgid: field_offset(&btf, "task_struct", "tgid")?,
        task_exit_code: field_offset(&btf, "task_struct", "exit_code")?,
        task_ptrace: field_offset(&btf, "task_struct", "ptrace")?,
        task_flags: field_offset(&btf, "task_struct", "flags")?,
        task_signal: field_offset(&btf, "task_struct", "signal")?,
        task_group_leader: field_offset(&btf, "task_struct", "group_leader")?,
        task_start_time: field_offset(&btf, "task_struct", "start_time")?,
        task_start_boottime: field_offset(&btf, "task_struct", "start_boottime")?,
        task_cred: field_offset(&btf, "task_struct", "cred")?,
        cred_group_info: field_offset(&btf, "cred", "group_info")?,
        group_info_ngroups: field_offset(&btf, "group_info", "ngroups")?,
        group_info_gid: field_offset(&btf, "group_info", "gid")?,
        sb_magic: field_offset(&btf, "super_block", "s_magic")?,
        sb_user_ns: field_offset(&btf, "super_block", "s_user_ns")?,
        user_ns_level: field_offset(&btf, "user_namespace", "level")?,
        // struct sock starts with struct sock_common (__sk_common).
        sock_family: field_offset(&btf, "sock_common", "skc_family")?,
        task_mm: field_offset(&btf, "task_struct", "mm")?,
        mm_exe_file: field_offset(&btf, "mm_struct", "exe_file")?,
        signal_live: field_offset(&btf, "signal_struct", "live")?,
        regs_orig_ax: field_offset(&btf, "pt_regs", "orig_ax")?,
        cgroup_kn: field_offset(&btf, "cgroup", "kn")?,
        kernfs_id: field_offset(&btf, "kernfs_node", "id")?,
        kernfs_parent: first_offset(&btf, "kernfs_node", &["__parent", "parent"])?,
        mmap_prot_arg: param_index(&btf, "bpf_lsm_mmap_file", "prot")?,
        mprotect_prot_arg: param_index(&btf, "bpf_lsm_file_mprotect", "prot")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against this machine's own kernel BTF, which every supported kernel has.
    #[test]
    fn resolves_offsets_from_host_btf() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            panic!("this test needs kernel BTF at {}", path.display());
        }
        let off = resolve(path).unwrap();
        // struct socket starts with `socket_state state` (an int); `type` follows it.
        assert_eq!(off.socket_type, 4);
        // pid and tgid are adjacent pid_t fields.
        assert_eq!(off.task_tgid, off.task_pid + 4);
        assert!(off.binprm_file > 0 && off.inode_sb > 0 && off.sb_dev > 0);
        // The LSM hooks' prot argument: (file, [reqprot,] prot, flags).
        assert!(matches!(off.mmap_prot_arg, 1 | 2), "{off:?}");
        assert!(matches!(off.mprotect_prot_arg, 1 | 2), "{off:?}");
        assert!(matches!(off.inode_ctime_nsec_size, 4 | 8), "{off:?}");
        assert!(off.inode_ctime_nsec > off.inode_ctime_sec, "{off:?}");
    }

    #[test]
    fn missing_btf_says_what_to_do() {
        let err = resolve(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }
}
