#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test Airlock, and is quick
# (a few checks, no downloads) when everything is already present. Idempotent.
#
# - apt: QEMU (software-emulated guest with a BPF LSM kernel), busybox, cpio, kmod, protoc,
#   Chromium and its WebDriver (web UI tests)
# - Debian's 6.1 kernel package, unpacked under $AIRLOCK_VM_DIR (default: target/vm)
# - rust-src for the nightly toolchain (eBPF side is built with -Z build-std=core)
# - bpf-linker built against the nightly's own LLVM
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
vm_dir=${AIRLOCK_VM_DIR:-$root/target/vm}
log() { printf '[setup] %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- apt packages -------------------------------------------------------------------------
need_pkgs=()
for p in qemu-system-x86 busybox-static cpio kmod protobuf-compiler systemd \
         chromium chromium-driver fonts-liberation; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing apt packages: ${need_pkgs[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# --- guest kernel -------------------------------------------------------------------------
mkdir -p "$vm_dir"
if ! ls "$vm_dir"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
  [ -n "$(apt-cache search --names-only '^linux-image-6\.1\.' 2>/dev/null | head -1)" ] || as_root apt-get update -qq
  # Newest 6.1 ABI of the plain amd64 flavour (virtio and BPF LSM in its config).
  pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' \
        | sort -t- -k4,4n | tail -1)
  [ -n "$pkg" ] || { log "no linux-image-6.1.0-*-amd64 package found in apt"; exit 1; }
  log "downloading guest kernel $pkg"
  ( cd "$vm_dir" && rm -f linux-image-*.deb && apt-get download -qq "$pkg" )
  rm -rf "$vm_dir/kernel"
  dpkg -x "$vm_dir"/"$pkg"_*.deb "$vm_dir/kernel"
  rm -f "$vm_dir"/linux-image-*.deb
  kver=$(basename "$vm_dir"/kernel/lib/modules/*)
  depmod -b "$vm_dir/kernel" "$kver"
fi

# --- nightly toolchain pieces for the eBPF side ---------------------------------------------
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
installed=$(rustup component list --toolchain nightly --installed)
for c in rust-src rustfmt clippy; do
  if ! grep -q "^$c" <<<"$installed"; then
    log "adding $c to nightly"
    rustup component add "$c" --toolchain nightly
  fi
done

if ! command -v bpf-linker >/dev/null 2>&1; then
  sysroot=$(rustc +nightly --print sysroot)
  llvm_so=$(ls "$sysroot"/lib/libLLVM.so.* 2>/dev/null | head -1)
  [ -n "$llvm_so" ] || { log "nightly toolchain has no libLLVM.so.* in $sysroot/lib"; exit 1; }
  llvm_major=$(basename "$llvm_so" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')
  prefix="$root/target/llvm-prefix"
  mkdir -p "$prefix/lib"
  ln -sf "$llvm_so" "$prefix/lib/libLLVM.so"
  log "building bpf-linker against nightly LLVM $llvm_major (about 2 minutes)"
  LLVM_PREFIX="$prefix" cargo +nightly install --locked bpf-linker --version '^0.13' \
    --no-default-features --features "llvm-$llvm_major"
fi

log "ready (guest kernel: $(ls "$vm_dir"/kernel/boot/vmlinuz-* | xargs -n1 basename))"
