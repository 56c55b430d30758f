//! Builds the eBPF object (crate agent-ebpf) with the nightly toolchain and bpf-linker pinned in
//! scripts/toolchain.env, so that `cargo build` of the agent always embeds kernel programs
//! built from the current source, by the same compiler on every machine.
use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .context("agent-user has no parent directory")?;
    let ebpf = root.join("agent-ebpf");
    let pins = root.join("scripts/toolchain.env");
    let nightly = pinned(&pins, "AIRLOCK_NIGHTLY")?;
    for dir in [
        "scripts/toolchain.env",
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Its own target dir: the outer build's flags (host target, RUSTFLAGS) must not leak in.
    let target_dir = root.join("target").join("ebpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ebpf)
        .arg(format!("+{nightly}"))
        .args(["build", "--release", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().with_context(|| {
        format!("running cargo +{nightly} for agent-ebpf (run scripts/setup.sh first)")
    })?;
    if !status.success() {
        bail!("building agent-ebpf with {nightly} failed ({status}); scripts/setup.sh installs that toolchain, its rust-src and the bpf-linker it needs");
    }
    let obj = target_dir.join("bpfel-unknown-none/release/airlock");
    std::fs::copy(&obj, out.join("airlock.bpf.o"))
        .with_context(|| format!("copying {}", obj.display()))?;
    Ok(())
}

/// The value of `KEY=value` in the shell-style file `path` (comments and blank lines skipped).
fn pinned(path: &std::path::Path, key: &str) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .with_context(|| format!("{}: no {key}=... line", path.display()))
}
