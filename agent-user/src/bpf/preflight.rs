//! Checks, before loading anything, that this kernel and this process can run the programs, so
//! the user gets an error that says what to change instead of a bare EPERM.

use std::path::Path;

/// What stops the agent from running here.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// Not root / missing capabilities.
    #[error(
        "airlock-agent needs root (or CAP_BPF, CAP_SYS_ADMIN, CAP_PERFMON, CAP_KILL and \
         CAP_SYS_PTRACE) to load BPF LSM programs and manage held tasks; run it as root or \
         through its systemd unit"
    )]
    NotPrivileged,
    /// securityfs cannot be read.
    #[error(
        "cannot read {path} to check for BPF LSM: {reason}. Mount securityfs with \
         `mount -t securityfs none /sys/kernel/security`"
    )]
    NoSecurityFs {
        /// File tried.
        path: String,
        /// Why.
        reason: String,
    },
    /// BPF LSM is compiled in but not active.
    #[error(
        "the kernel's active LSMs are \"{active}\" and do not include bpf, so BPF LSM programs \
         cannot hold anything. Add bpf to the lsm= boot parameter, keeping the others in order: \
         lsm={active},bpf (on Debian/Ubuntu: append it to GRUB_CMDLINE_LINUX in \
         /etc/default/grub, run update-grub and reboot). The kernel also needs CONFIG_BPF_LSM=y"
    )]
    BpfLsmInactive {
        /// Contents of /sys/kernel/security/lsm.
        active: String,
    },
    /// The agent runs in a PID namespace of its own (a container): the kernel would not know
    /// it by its pid.
    #[error(
        "airlock-agent runs in a PID namespace of its own (its pids are {nspid}); the kernel side \
         recognises the agent by its pid in the host's namespace. Run it on the host (its systemd \
         unit), or in a container with the host PID namespace (--pid=host)"
    )]
    PidNamespace {
        /// The NSpid line of /proc/self/status.
        nspid: String,
    },
    /// Kernel lockdown forbids BPF programs to read kernel memory.
    #[error(
        "kernel lockdown is in confidentiality mode ({path} reads \"{mode}\"): BPF programs may \
         not read kernel memory, and the agent's programs must (to know which file an exec \
         runs and where a connect goes). Lockdown cannot be lowered while the system runs: \
         reboot with lockdown=integrity (what Secure Boot sets on most distributions) or none, \
         and without whatever raised it (a lockdown= parameter, a boot script writing \
         confidentiality, or a kernel built with CONFIG_LOCK_DOWN_KERNEL_FORCE_CONFIDENTIALITY)"
    )]
    Lockdown {
        /// The lockdown file.
        path: String,
        /// Its contents.
        mode: String,
    },
    /// No kernel BTF.
    #[error(
        "{path} is missing: this kernel was built without CONFIG_DEBUG_INFO_BTF=y, which BPF \
         LSM programs need. Use a distribution kernel that has it (Debian 11+, Ubuntu 20.10+, \
         Fedora, RHEL 8.2+)"
    )]
    NoBtf {
        /// Path checked.
        path: String,
    },
}

/// Runs every check against the files under `sys` (normally `/sys`).
pub fn check(sys: &Path) -> Result<(), PreflightError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(PreflightError::NotPrivileged);
    }
    check_lsm(sys)?;
    check_lockdown(sys)?;
    check_pid_namespace(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())?;
    check_btf(sys)
}

/// Whether the kernel exposes its BTF (`kernel/btf/vmlinux` under `sys`).
pub fn check_btf(sys: &Path) -> Result<(), PreflightError> {
    let btf = sys.join("kernel/btf/vmlinux");
    if btf.exists() {
        Ok(())
    } else {
        Err(PreflightError::NoBtf {
            path: btf.display().to_string(),
        })
    }
}

/// Whether this process is in the host's PID namespace: /proc/self/status (`status`) lists one
/// pid on its NSpid line.
pub fn check_pid_namespace(status: &str) -> Result<(), PreflightError> {
    match status.lines().find_map(|l| l.strip_prefix("NSpid:")) {
        Some(pids) if pids.split_whitespace().count() > 1 => Err(PreflightError::PidNamespace {
            nspid: pids.trim().to_owned(),
        }),
        _ => Ok(()),
    }
}

/// Whether kernel lockdown (`kernel/security/lockdown` under `sys`, absent without the lockdown
/// LSM) lets BPF programs read kernel memory: every mode but confidentiality does.
pub fn check_lockdown(sys: &Path) -> Result<(), PreflightError> {
    let path = sys.join("kernel/security/lockdown");
    let mode = std::fs::read_to_string(&path).unwrap_or_default();
    if mode.contains("[confidentiality]") {
        Err(PreflightError::Lockdown {
            path: path.display().to_string(),
            mode: mode.trim().to_owned(),
        })
    } else {
        Ok(())
    }
}

/// Whether `bpf` is among the active LSMs. Mounts securityfs if it is not mounted yet.
pub fn check_lsm(sys: &Path) -> Result<(), PreflightError> {
    let lsm = sys.join("kernel/security/lsm");
    if !lsm.exists() && sys == Path::new("/sys") {
        // Best effort; the read below reports the real problem if this fails.
        let _ = nix::mount::mount(
            Some("securityfs"),
            "/sys/kernel/security",
            Some("securityfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    let active = std::fs::read_to_string(&lsm).map_err(|e| PreflightError::NoSecurityFs {
        path: lsm.display().to_string(),
        reason: e.to_string(),
    })?;
    let active = active.trim();
    if active.split(',').any(|m| m == "bpf") {
        Ok(())
    } else {
        Err(PreflightError::BpfLsmInactive {
            active: active.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sys(lsm: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kernel/security")).unwrap();
        std::fs::write(dir.path().join("kernel/security/lsm"), lsm).unwrap();
        dir
    }

    #[test]
    fn inactive_bpf_lsm_explains_boot_parameter() {
        let sys = fake_sys("lockdown,capability,apparmor\n");
        let err = check_lsm(sys.path()).unwrap_err().to_string();
        assert!(
            err.contains("lsm=lockdown,capability,apparmor,bpf"),
            "{err}"
        );
        assert!(err.contains("update-grub"), "{err}");
    }

    #[test]
    fn a_pid_namespace_of_its_own_is_refused() {
        let err = check_pid_namespace("Name:\tairlock-agent\nNSpid:\t4242\t1\n").unwrap_err();
        assert!(err.to_string().contains("--pid=host"), "{err}");
        check_pid_namespace("NSpid:\t4242\n").unwrap();
    }

    #[test]
    fn missing_btf_names_the_kernel_option() {
        let sys = fake_sys("bpf\n");
        let err = check_btf(sys.path()).unwrap_err().to_string();
        assert!(err.contains("CONFIG_DEBUG_INFO_BTF=y"), "{err}");
        assert!(err.contains("kernel/btf/vmlinux is missing"), "{err}");
        std::fs::create_dir_all(sys.path().join("kernel/btf")).unwrap();
        std::fs::write(sys.path().join("kernel/btf/vmlinux"), b"").unwrap();
        check_btf(sys.path()).unwrap();
    }

    #[test]
    fn lsm_list_without_bpf_is_refused_even_with_bpf_in_a_longer_name() {
        let sys = fake_sys("capability,bpfish\n");
        let err = check_lsm(sys.path()).unwrap_err().to_string();
        assert!(err.contains("lsm=capability,bpfish,bpf"), "{err}");
    }

    #[test]
    fn lockdown_confidentiality_is_refused_and_integrity_passes() {
        let sys = fake_sys("lockdown,capability,bpf\n");
        check_lockdown(sys.path()).unwrap();
        let file = sys.path().join("kernel/security/lockdown");
        std::fs::write(&file, "none [integrity] confidentiality\n").unwrap();
        check_lockdown(sys.path()).unwrap();
        std::fs::write(&file, "none integrity [confidentiality]\n").unwrap();
        let err = check_lockdown(sys.path()).unwrap_err().to_string();
        assert!(err.contains("confidentiality mode"), "{err}");
        assert!(err.contains("lockdown=integrity"), "{err}");
    }

    #[test]
    fn active_bpf_lsm_passes() {
        let sys = fake_sys("lockdown,capability,bpf\n");
        check_lsm(sys.path()).unwrap();
    }
}
