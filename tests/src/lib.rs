//! Test support for Airlock's end-to-end tests: a QEMU guest with Debian's kernel ([`vm`]),
//! a recording gRPC decider ([`decider`]) and an approvals client ([`approvals`]).

pub mod approvals;
pub mod decider;
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
