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
    let missing = OffsetError::Missing { strukt, field };
    let types = btf
        .resolve_types_by_name(strukt)
        .map_err(|_| missing.clone())?;
    for t in types {
        if let Type::Struct(s) = t {
            if let Some(bits) = find_member(btf, &s, field) {
                return Ok(u64::from(bits / 8));
            }
        }
    }
    Err(missing)
}

/// Bit offset of `field` in `s`.
fn find_member(btf: &Btf, s: &btf_rs::Struct, field: &str) -> Option<u32> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == field {
            return Some(m.bit_offset());
        }
        if name.is_empty() {
            // Anonymous struct or union: look inside, adding its own offset.
            if let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m) {
                if let Some(bits) = find_member(btf, &inner, field) {
                    return Some(m.bit_offset() + bits);
                }
            }
        }
    }
    None
}

/// Resolves every offset the programs use from the BTF file at `path`
/// (normally /sys/kernel/btf/vmlinux).
pub fn resolve(path: &Path) -> Result<KernelOffsets, OffsetError> {
    let btf = Btf::from_file(path).map_err(|e| OffsetError::NoBtf {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(KernelOffsets {
        binprm_file: field_offset(&btf, "linux_binprm", "file")?,
        file_inode: field_offset(&btf, "file", "f_inode")?,
        inode_ino: field_offset(&btf, "inode", "i_ino")?,
        inode_sb: field_offset(&btf, "inode", "i_sb")?,
        sb_dev: field_offset(&btf, "super_block", "s_dev")?,
        socket_type: field_offset(&btf, "socket", "type")?,
        task_pid: field_offset(&btf, "task_struct", "pid")?,
        task_tgid: field_offset(&btf, "task_struct", "tgid")?,
        task_exit_code: field_offset(&btf, "task_struct", "exit_code")?,
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
    }

    #[test]
    fn missing_btf_says_what_to_do() {
        let err = resolve(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }
}
