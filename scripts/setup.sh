#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test Airlock, and is quick
# (a few checks, no downloads) when everything is already present. Idempotent.
#
# - apt: QEMU (software-emulated guest with a BPF LSM kernel), busybox, cpio, kmod, protoc,
#   Chromium and its WebDriver (web UI tests), PostgreSQL (the control plane's tests start
#   their own clusters with its initdb and pg_ctl; the package's own cluster is not used),
#   man-db and lintian (the packages' man pages and checks)
# - Debian's kernels 6.1, 6.12 and unstable's newest, unpacked under $AIRLOCK_VM_DIR
#   (default: target/vm), for the QEMU guests
# - the nightly pinned in scripts/toolchain.env with rust-src (the eBPF side is built with
#   -Z build-std=core), and the pinned bpf-linker built against that nightly's own LLVM
# - cargo-deb (scripts/package.sh)
# - cargo-fuzz (scripts/fuzz.sh, and its smoke pass in scripts/test.sh)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
vm_dir=${AIRLOCK_VM_DIR:-$root/target/vm}
log() { printf '[setup] %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- apt packages -------------------------------------------------------------------------
need_pkgs=()
for p in qemu-system-x86 busybox-static cpio kmod xz-utils zstd btrfs-progs protobuf-compiler systemd \
         chromium chromium-driver fonts-liberation postgresql man-db lintian; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing apt packages: ${need_pkgs[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# --- guest kernels --------------------------------------------------------------------------
# Three series, each unpacked under $vm_dir/<name>/root with its modules.dep:
#   6.1   Debian 12's kernel (linux-image-6.1.0-N-amd64)
#   6.12  bookworm's 6.12 backport (linux-image-6.12.N+deb12-amd64)
#   sid   the newest amd64 kernel in Debian unstable, fetched through an apt source list of our
#         own under $vm_dir/apt (the machine's apt sources are never changed)
# A kernel is fetched once; delete its folder to fetch a newer one.
mkdir -p "$vm_dir"
rm -rf "$vm_dir/kernel"   # the single-kernel layout of earlier versions
kernel_ready() { [ -e "$vm_dir/$1/ready" ]; }

# unpack_kernel NAME DEB...: unpacks the packages and writes modules.dep for the guest harness.
unpack_kernel() {
  local name=$1; shift
  local dir="$vm_dir/$name"
  rm -rf "$dir"; mkdir -p "$dir/root"
  for deb in "$@"; do dpkg -x "$deb" "$dir/root"; done
  local mods="" m
  for m in "$dir"/root/lib/modules/* "$dir"/root/usr/lib/modules/*; do
    [ -d "$m" ] && { mods=$m; break; }
  done
  [ -n "$mods" ] || { log "$name: no modules directory in $*"; exit 1; }
  local kver; kver=$(basename "$mods")
  # depmod looks under lib/modules; 7.x packages install to usr/lib/modules.
  if [ ! -d "$dir/root/lib/modules/$kver" ]; then
    mkdir -p "$dir/root/lib/modules"; ln -s "../../usr/lib/modules/$kver" "$dir/root/lib/modules/$kver"
  fi
  depmod -b "$dir/root" "$kver"
  echo "$kver" > "$dir/ready"
}

# newest PATTERN: the newest package name matching PATTERN in the apt lists ($apt_opts applies).
newest() { apt-cache "${apt_opts[@]}" search --names-only "$1" | awk '{print $1}' | sort -V | tail -1; }

fetch_kernel() {
  local name=$1 pattern=$2; shift 2
  kernel_ready "$name" && return 0
  local pkg; pkg=$(newest "$pattern")
  if [ -z "$pkg" ]; then
    as_root apt-get "${apt_opts[@]}" update -qq
    pkg=$(newest "$pattern")
  fi
  [ -n "$pkg" ] || { log "no package matching $pattern"; exit 1; }
  local ver=${pkg#linux-image-}
  local dl="$vm_dir/download"; rm -rf "$dl"; mkdir -p "$dl"
  local pkgs=("$pkg")
  # 7.x image packages are empty shells that depend on the kernel, its modules and base files.
  for part in binary modules base; do
    [ -n "$(apt-cache "${apt_opts[@]}" search --names-only "^linux-$part-${ver//+/\\+}\$")" ] \
      && pkgs+=("linux-$part-$ver")
  done
  log "downloading guest kernel $name: ${pkgs[*]}"
  ( cd "$dl" && apt-get "${apt_opts[@]}" download -qq "${pkgs[@]}" )
  unpack_kernel "$name" "$dl"/*.deb
  rm -rf "$dl"
}

apt_opts=()
fetch_kernel 6.1 '^linux-image-6\.1\.0-[0-9]+-amd64$'
fetch_kernel 6.12 '^linux-image-6\.12\.[0-9]+\+deb12-amd64$'
sid_apt="$vm_dir/apt"
mkdir -p "$sid_apt/lists/partial" "$sid_apt/cache/archives/partial"
if ! kernel_ready sid; then
  uri=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | grep -v security | head -1 | sed -E 's/^URIs: *//; s/^deb +(\[[^]]*\] +)?//; s/ .*//' || true)
  uri=${uri:-http://deb.debian.org/debian}
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri sid main" > "$sid_apt/sources.list"
fi
apt_opts=(-o "Dir::Etc::sourcelist=$sid_apt/sources.list" -o Dir::Etc::sourceparts=/dev/null
          -o "Dir::State::Lists=$sid_apt/lists" -o "Dir::Cache=$sid_apt/cache")
fetch_kernel sid '^linux-image-[0-9]+\.[0-9]+\.[0-9]+\+deb[0-9]+-amd64$'
apt_opts=()

# --- nightly toolchain pieces for the eBPF side ---------------------------------------------
# Pinned in scripts/toolchain.env (AIRLOCK_NIGHTLY, AIRLOCK_BPF_LINKER).
# shellcheck source=toolchain.env
. "$root/scripts/toolchain.env"
if ! rustup toolchain list | grep -q "^$AIRLOCK_NIGHTLY"; then
  log "installing $AIRLOCK_NIGHTLY"
  rustup toolchain install "$AIRLOCK_NIGHTLY" --profile minimal
fi
installed=$(rustup component list --toolchain "$AIRLOCK_NIGHTLY" --installed)
for c in rust-src rustfmt clippy; do
  if ! grep -q "^$c" <<<"$installed"; then
    log "adding $c to $AIRLOCK_NIGHTLY"
    rustup component add "$c" --toolchain "$AIRLOCK_NIGHTLY"
  fi
done

sysroot=$(rustc "+$AIRLOCK_NIGHTLY" --print sysroot)
llvm_so=$(ls "$sysroot"/lib/libLLVM.so.* 2>/dev/null | head -1)
[ -n "$llvm_so" ] || { log "$AIRLOCK_NIGHTLY has no libLLVM.so.* in $sysroot/lib"; exit 1; }
llvm_major=$(basename "$llvm_so" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')
# Built at the pinned version against this LLVM major (recorded beside it by this script; an
# older set-up recorded nothing), or built again.
stamp="${CARGO_HOME:-$HOME/.cargo}/bpf-linker.llvm"
need_linker() {
  cargo install --list | grep -qx "bpf-linker v$AIRLOCK_BPF_LINKER:" || return 0
  [ -e "$stamp" ] && [ "$(cat "$stamp")" != "$llvm_major" ]
}
if need_linker; then
  prefix="$root/target/llvm-prefix"
  mkdir -p "$prefix/lib"
  ln -sf "$llvm_so" "$prefix/lib/libLLVM.so"
  log "building bpf-linker $AIRLOCK_BPF_LINKER against $AIRLOCK_NIGHTLY's LLVM $llvm_major (about 2 minutes)"
  LLVM_PREFIX="$prefix" cargo "+$AIRLOCK_NIGHTLY" install --locked --force bpf-linker \
    --version "=$AIRLOCK_BPF_LINKER" --no-default-features --features "llvm-$llvm_major"
  echo "$llvm_major" > "$stamp"
fi

# --- cargo-deb (scripts/package.sh) --------------------------------------------------------
cargo_deb_version=3.8.0
if [ "$(cargo deb --version 2>/dev/null | awk '{print $NF}')" != "$cargo_deb_version" ]; then
  log "installing cargo-deb $cargo_deb_version (about 2 minutes)"
  cargo install --locked cargo-deb --version "=$cargo_deb_version"
fi

# --- cargo-fuzz (scripts/fuzz.sh) -----------------------------------------------------------
cargo_fuzz_version=0.13.2
if [ "$(cargo fuzz --version 2>/dev/null | awk '{print $NF}')" != "$cargo_fuzz_version" ]; then
  log "installing cargo-fuzz $cargo_fuzz_version"
  cargo install --locked cargo-fuzz --version "=$cargo_fuzz_version"
fi

log "ready (guest kernels: $(cat "$vm_dir"/{6.1,6.12,sid}/ready | xargs))"
