#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a set time each, keeping (and growing) its corpus in
# fuzz/corpus/<target>; crashes land in fuzz/artifacts/<target>. Needs the nightly pinned in
# scripts/toolchain.env and cargo-fuzz (scripts/setup.sh installs both).
#
#   bash scripts/fuzz.sh            # 10 minutes per target, AddressSanitizer
#   bash scripts/fuzz.sh 3600       # an hour per target
#   bash scripts/fuzz.sh --smoke    # CI: the corpus once through each target, then 10 s each
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
. scripts/toolchain.env   # AIRLOCK_NIGHTLY
secs=${1:-600}
smoke=0
# Safe Rust rarely needs ASan to turn a bug into a crash (panics and overflow checks do): the
# smoke pass skips it, which cut a cold build from 20 to 12 minutes (-j 1), and long runs keep it.
sanitizer=address
if [[ "$secs" == "--smoke" ]]; then
  smoke=1
  secs=10
  sanitizer=none
fi
if ! cargo "+$AIRLOCK_NIGHTLY" fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: bash scripts/setup.sh installs it" >&2
  exit 2
fi
targets=(config_toml agent_message slack_interaction oidc_token web_form)
# -a: overflow checks and debug assertions, which catch bugs the optimised build would hide.
flags=(-O -a -s "$sanitizer" --fuzz-dir fuzz)
# The smoke pass replays the corpus and looks around briefly: an unoptimised build (debug
# assertions and overflow checks on) makes the whole pass 3.5 minutes instead of about 8 here,
# and libFuzzer still replays every corpus whole (the time limit applies after it).
if [[ $smoke == 1 ]]; then
  flags=(--dev -s none --fuzz-dir fuzz)
fi
cargo "+$AIRLOCK_NIGHTLY" fuzz build "${flags[@]}"
status=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  corpus=("fuzz/corpus/$t")
  if [[ $smoke == 1 ]]; then
    # libFuzzer writes new inputs to the first directory: a scratch one, so that CI leaves the
    # checked-in corpus as it is.
    scratch=$(mktemp -d)
    corpus=("$scratch" "fuzz/corpus/$t")
  fi
  echo "== fuzz $t for ${secs}s"
  # -rss_limit_mb: the store keeps a SQLite page cache; the limit still catches leaks.
  if ! cargo "+$AIRLOCK_NIGHTLY" fuzz run "${flags[@]}" "$t" "${corpus[@]}" -- \
      -max_total_time="$secs" -rss_limit_mb=4096 -timeout=10 \
      -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 2>&1 | tail -n 20; then
    echo "!! $t found a crash: see fuzz/artifacts/$t/" >&2
    status=1
  fi
  if [[ $smoke == 1 ]]; then rm -rf "$scratch"; fi
done
if [[ $smoke == 1 ]]; then
  echo "smoke pass done"
fi
exit "$status"
