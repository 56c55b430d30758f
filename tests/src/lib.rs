//! Test support for Airlock's end-to-end tests: a QEMU guest with Debian's kernel ([`vm`]),
//! a recording gRPC decider ([`decider`]), an approvals client ([`approvals`]) and the real
//! control plane as a process ([`server`]).

pub mod approvals;
pub mod decider;
pub mod server;
pub mod vm;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Builds (if needed) and returns the path of a workspace binary, with the same profile as the
/// running test or tool.
pub fn workspace_bin(package: &str, bin: &str) -> Result<PathBuf> {
    // target/<profile>/deps/<test> or target/<profile>/<tool>
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", package, "--bin", bin]);
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    let status = cmd
        .current_dir(vm::workspace_root())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p {package} --bin {bin} failed");
    }
    let path = dir.join(bin);
    if !path.exists() {
        bail!("{} was not built", path.display());
    }
    Ok(path)
}

/// Makes the Debian packages with `scripts/package.sh --debug` from this build's debug
/// binaries (built here if needed) in this build's target dir; returns the paths of
/// `airlock-agent_*.deb` and `airlock-server_*.deb`.
pub fn debian_packages() -> Result<(PathBuf, PathBuf)> {
    for (package, bin) in [
        ("agent-user", "airlock-agent"),
        ("control-plane", "airlock-server"),
        ("control-plane", "airlockctl"),
    ] {
        workspace_bin(package, bin)?;
    }
    // target/debug/deps/<test> -> target
    let exe = std::env::current_exe()?;
    let target = exe
        .ancestors()
        .nth(3)
        .context("test executable is not in target/<profile>/deps")?
        .to_path_buf();
    let out = std::process::Command::new("bash")
        .arg(vm::workspace_root().join("scripts/package.sh"))
        .arg("--debug")
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .context("running scripts/package.sh")?;
    if !out.status.success() {
        bail!(
            "scripts/package.sh --debug: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let find = |name: &str| -> Result<PathBuf> {
        for entry in std::fs::read_dir(target.join("debian"))? {
            let path = entry?.path();
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            if file.starts_with(&format!("{name}_")) && file.ends_with("_amd64.deb") {
                return Ok(path);
            }
        }
        bail!("no {name}_*.deb in {}/debian", target.display())
    };
    Ok((find("airlock-agent")?, find("airlock-server")?))
}

/// Declares one test module per kernel series (`k6_1`, `k6_12`, `sid`), each with one `#[test]`
/// per check. A module boots its guest once, on first use, with `boot(kernel)`, and every
/// check of that module asserts on the same run: `check(&booted)`.
///
/// A kernel left out of `AIRLOCK_KERNELS` (see [`vm::kernels`]) is reported and not booted;
/// CI sets no such filter, so it covers every kernel.
#[macro_export]
macro_rules! kernel_matrix {
    (boot = $boot:ident, booted = $ty:ident, checks = [$($check:ident),* $(,)?]) => {
        $crate::kernel_matrix!(@kernel k6_1, "6.1", $boot, $ty, [$($check),*]);
        $crate::kernel_matrix!(@kernel k6_12, "6.12", $boot, $ty, [$($check),*]);
        $crate::kernel_matrix!(@kernel sid, "sid", $boot, $ty, [$($check),*]);
    };
    (@kernel $m:ident, $k:literal, $boot:ident, $ty:ident, [$($check:ident),*]) => {
        mod $m {
            fn booted() -> Option<&'static super::$ty> {
                static BOOT: std::sync::OnceLock<Result<super::$ty, String>> = std::sync::OnceLock::new();
                if !$crate::vm::covers($k) {
                    eprintln!("kernel {} is not in AIRLOCK_KERNELS: not booted", $k);
                    return None;
                }
                match BOOT.get_or_init(|| super::$boot($k).map_err(|e| format!("{e:#}"))) {
                    Ok(b) => Some(b),
                    Err(e) => panic!("guest run on kernel {} failed: {e}", $k),
                }
            }
            $(
                #[test]
                fn $check() {
                    if let Some(b) = booted() {
                        super::$check(b)
                    }
                }
            )*
        }
    };
}

/// This machine, for benchmark reports: CPU model, cores and kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}
