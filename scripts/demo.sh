#!/usr/bin/env bash
# The demo: sets up what is missing, builds, starts airlock-server on loopback, boots a QEMU guest
# (Debian's kernel) running airlock-agent and an AI-agent account that tries privileged actions,
# and prints the web UI address and a login: approve or deny each action in the browser (or, with
# AIRLOCK_DEMO_DECIDE=terminal, here with a and d). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --quiet -p control-plane -p agent-user -p airlock-tests --bins
port=${AIRLOCK_DEMO_PORT:-7443}
http=${AIRLOCK_DEMO_HTTP:-127.0.0.1:7080}
data=target/demo/data
rm -rf target/demo && mkdir -p "$data"
# Credentials: one for the guest's agent, one for you as approver (stored hashed in the database).
target/debug/airlock-server --data-dir "$data" tokens create --name demo-guest --scope agent > target/demo/agent.token
approver="$(id -un)-demo"
AIRLOCK_TOKEN=$(target/debug/airlock-server --data-dir "$data" tokens create --name "$approver" --scope approve)
export AIRLOCK_TOKEN
# A web UI login for you (Argon2id hash in the database; the password is printed below).
read -r web_user web_password < <(target/debug/airlock-server --data-dir "$data" users add demo --generate-password)

pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -f "qemu-system-x86_64 .*-name airlock-guest" 2>/dev/null || true
  wait 2>/dev/null || true
  echo "demo stopped; server log: target/demo/server.log; audit check:"
  target/debug/airlockctl audit verify --db "$data/airlock.db" || true
}
trap cleanup EXIT INT TERM

target/debug/airlock-server --data-dir "$data" --grpc "127.0.0.1:$port" --http "$http" > target/demo/server.log 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do grep -q "gRPC on" target/demo/server.log && break; sleep 0.1; done
echo "airlock-server listening on http://127.0.0.1:$port (log: target/demo/server.log)"
echo
echo "  Web UI:  http://$http/    login: $web_user / $web_password"
echo

target/debug/airlock-demo --rounds "${AIRLOCK_DEMO_ROUNDS:-3}" --server-port "$port" --agent-token-file target/demo/agent.token &
pids+=($!)
demo=$!

if [ -t 0 ] && [ "${AIRLOCK_DEMO_DECIDE:-web}" = terminal ]; then
  echo "You are approver $approver. Approve (a) or deny (d) each held action below;"
  echo "unanswered ones are denied at their deadline."
  target/debug/airlockctl --server "http://127.0.0.1:$port" requests watch --decide &
else
  # Decide in the browser; this terminal shows the requests as they arrive and the guest's
  # output. Unanswered ones are denied at their deadline.
  target/debug/airlockctl --server "http://127.0.0.1:$port" requests watch &
fi
pids+=($!)
wait "$demo"
