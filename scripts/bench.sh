#!/usr/bin/env bash
# Sets up what is missing, then measures the agent's overhead and hold round trips in one QEMU
# guest boot and writes bench/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo run --release -p airlock-tests --bin airlock-bench -- --out bench/results.md "$@"
