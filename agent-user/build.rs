//! Builds the eBPF object (crate agent-ebpf) with the nightly toolchain and bpf-linker, so that
//! `cargo build` of the agent always embeds kernel programs built from the current source.
use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .context("agent-user has no parent directory")?;
    let ebpf = root.join("agent-ebpf");
    for dir in [
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
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
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
    let status = cmd
        .status()
        .context("running cargo +nightly for agent-ebpf (run scripts/setup.sh first)")?;
    if !status.success() {
        bail!("building agent-ebpf failed ({status}); scripts/setup.sh installs the nightly rust-src and bpf-linker it needs");
    }
    let obj = target_dir.join("bpfel-unknown-none/release/airlock");
    std::fs::copy(&obj, out.join("airlock.bpf.o"))
        .with_context(|| format!("copying {}", obj.display()))?;
    Ok(())
}
