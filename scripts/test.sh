#!/usr/bin/env bash
# Sets up what is missing (scripts/setup.sh), then runs every check and test:
# formatting, clippy (host crates and the eBPF crate), unit tests, the control plane's tests over
# real sockets on SQLite and on PostgreSQL (clusters the tests start themselves), and the kernel
# tests in QEMU guests running Debian's kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
. scripts/toolchain.env   # AIRLOCK_NIGHTLY: the eBPF crate's pinned nightly
# One full build, not an edit loop: incremental caches would only cost disk (gigabytes) and time.
export CARGO_INCREMENTAL=0

echo "== cargo fmt --check"
cargo fmt --all -- --check
(cd agent-ebpf && cargo "+$AIRLOCK_NIGHTLY" fmt -- --check)

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
(cd agent-ebpf && cargo "+$AIRLOCK_NIGHTLY" clippy --release --target bpfel-unknown-none -Z build-std=core -- -D warnings)

echo "== cargo test"
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --lib --bins --tests -- --test-threads=4 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# The fuzz targets' smoke pass: their entry points are built nowhere else (nightly, feature
# "fuzzing"), and the checked-in corpus holds inputs that once crashed the server. After the
# tests, so that a crash fails the run but the test counts below still print.
echo "== fuzz smoke"
fuzz_status=0
bash scripts/fuzz.sh --smoke || fuzz_status=$?
# Nothing else uses its build (fuzz/target, about 1 GB), and CI's disk is tight.
rm -rf fuzz/target
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
echo
echo "$passed passed, $failed failed"
if [ "$fuzz_status" -ne 0 ]; then
  echo "fuzz smoke pass failed (exit $fuzz_status): see its output above and fuzz/artifacts/"
  [ "$status" -ne 0 ] || status=$fuzz_status
fi
exit "$status"
