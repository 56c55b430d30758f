#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a set time each, keeping (and growing) its corpus in
# fuzz/corpus/<target>; crashes land in fuzz/artifacts/<target>. Needs the nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz --locked`).
#
#   bash scripts/fuzz.sh            # 10 minutes per target
#   bash scripts/fuzz.sh 3600       # an hour per target
#   bash scripts/fuzz.sh --smoke    # CI: the corpus once through each target, then 10 s each
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
secs=${1:-600}
smoke=0
if [[ "$secs" == "--smoke" ]]; then
  smoke=1
  secs=10
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
  exit 2
fi
targets=(config_toml agent_message slack_interaction oidc_token web_form)
cargo +nightly fuzz build -O --fuzz-dir fuzz
status=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  echo "== fuzz $t for ${secs}s"
  # -rss_limit_mb: the store keeps a SQLite page cache; the limit still catches leaks.
  if ! cargo +nightly fuzz run -O --fuzz-dir fuzz "$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=4096 -timeout=10 \
      -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 2>&1 | tail -n 20; then
    echo "!! $t found a crash: see fuzz/artifacts/$t/" >&2
    status=1
  fi
done
if [[ $smoke == 1 ]]; then
  echo "smoke pass done"
fi
exit "$status"
