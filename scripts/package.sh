#!/usr/bin/env bash
# Builds the Debian packages with cargo-deb (installed by scripts/setup.sh):
#   $CARGO_TARGET_DIR/debian/airlock-agent_<version>_<arch>.deb   (default target dir: target/)
#   $CARGO_TARGET_DIR/debian/airlock-server_<version>_<arch>.deb  (airlock-server + airlockctl)
# Each holds its binaries, its unit from deploy/ (ExecStart in /usr/bin), the example
# configuration from deploy/ as conffiles in /etc/airlock, man pages and bash/zsh/fish
# completions written by the binaries themselves, and the maintainer scripts in deploy/debian/.
#
#   bash scripts/package.sh           release build of the two crates' binaries (about 10 minutes
#                                     on 2 cores), then the packages; runs lintian
#   bash scripts/package.sh --debug   packages the debug binaries already built (cargo build
#                                     --workspace --bins), for the tests: seconds, no lintian
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
target=${CARGO_TARGET_DIR:-$root/target}
log() { printf '[package] %s\n' "$*" >&2; }

profile=release
case "${1:-}" in
  --debug) profile=dev ;;
  "") ;;
  *) echo "usage: $0 [--debug]" >&2; exit 2 ;;
esac

if [ "$profile" = release ]; then
  log "building release binaries of agent-user and control-plane"
  cargo build --release -p agent-user -p control-plane --bins
  bindir=$target/release
else
  bindir=$target/debug
fi
for b in airlock-agent airlock-server airlockctl; do
  [ -x "$bindir/$b" ] || { log "$bindir/$b is missing: build it first (cargo build --workspace --bins)"; exit 1; }
done

# stage PACKAGE: the generated files cargo-deb takes from target/deb-stage/PACKAGE (named in the
# crates' [package.metadata.deb]): the unit, man pages and completions.
stage_root=$root/target/deb-stage
rm -rf "$stage_root"
stage() {
  local pkg=$1; shift
  local dir=$stage_root/$pkg share
  share=$dir/usr/share
  mkdir -p "$dir/units" "$share/man/man1" "$share/bash-completion/completions" \
    "$share/zsh/vendor-completions" "$share/fish/vendor_completions.d"
  sed 's#/usr/local/bin/#/usr/bin/#g' "deploy/$pkg.service" > "$dir/units/$pkg.service"
  grep -q "ExecStart=/usr/bin/$pkg " "$dir/units/$pkg.service" \
    || { log "deploy/$pkg.service: ExecStart does not run /usr/local/bin/$pkg"; exit 1; }
  local bin docs
  for bin in "$@"; do
    docs=$(mktemp -d)
    if [ "$bin" = airlock-agent ]; then
      "$bindir/$bin" --write-docs "$docs"
    else
      "$bindir/$bin" write-docs "$docs"
    fi
    cp "$docs"/man/*.1 "$share/man/man1/"
    cp "$docs/completions/bash/$bin" "$share/bash-completion/completions/"
    cp "$docs/completions/zsh/_$bin" "$share/zsh/vendor-completions/"
    cp "$docs/completions/fish/$bin.fish" "$share/fish/vendor_completions.d/"
    rm -rf "$docs"
  done
}
stage airlock-agent airlock-agent
stage airlock-server airlock-server airlockctl

out=$target/debian
mkdir -p "$out"
rm -f "$out"/airlock-agent_*.deb "$out"/airlock-server_*.deb
for crate in agent-user control-plane; do
  # --profile dev only for --debug: cargo-deb warns that it is meant for release profiles.
  fast=()
  [ "$profile" = dev ] && fast=(--fast)   # debug binaries are large; xz -9 of them takes a minute
  cargo deb --no-build --profile "$profile" -p "$crate" --output "$out/" -q "${fast[@]}"

done
ls "$out"/airlock-agent_*.deb "$out"/airlock-server_*.deb

if [ "$profile" = release ] && command -v lintian >/dev/null; then
  log "lintian (deploy/debian/lintian/ overrides each tag it would report, with the reason)"
  lintian --tag-display-limit 0 "$out"/airlock-agent_*.deb "$out"/airlock-server_*.deb || true
fi
