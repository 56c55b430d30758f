#!/usr/bin/env bash
# Sets up what is missing, then measures the agent's overhead and hold round trips in one QEMU
# guest boot (bench/results.md), and how fast approvers are told and decisions reach the agent
# (bench/notify.md), then the control plane at scale on SQLite and PostgreSQL (bench/scale.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo run --release -p airlock-tests --bin airlock-bench -- --out bench/results.md "$@"
cargo run --release -p airlock-tests --bin airlock-notify-bench -- --out bench/notify.md
cargo run --release -p airlock-tests --bin airlock-scale-bench -- --out bench/scale.md
