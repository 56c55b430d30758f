//! Test support for Airlock's end-to-end tests: a QEMU guest with Debian's kernel ([`vm`]) and
//! a recording gRPC decider ([`decider`]).

pub mod decider;
pub mod vm;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Builds (if needed) and returns the path of a workspace binary, with the same profile as the
/// running test.
pub fn workspace_bin(package: &str, bin: &str) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .current_dir(vm::workspace_root())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p {package} --bin {bin} failed");
    }
    // target/debug/deps/<test> -> target/debug/<bin>
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("test executable has no target directory")?;
    let path = dir.join(bin);
    if !path.exists() {
        bail!("{} was not built", path.display());
    }
    Ok(path)
}
