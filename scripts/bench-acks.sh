#!/usr/bin/env bash
# The price of valkey.ack_replicas (docs/high-availability.md, BENCHMARKS.md):
#   bash scripts/bench-acks.sh BINDIR
# BINDIR holds release builds of crm-chat and crm-chat-load
# (`cargo build --release --workspace`: target/release). Needs valkey-server
# (or redis-server) and its CLI on PATH.
#
# A Valkey primary with one replica (no persistence, localhost). For
# ack_replicas=0 and =1, alternately, a fresh crm-chat node on the primary runs
# `fanout --members 1000 --senders 10 --messages 2000 --rate 200` and
# `pairs --pairs 50 --duration-s 10`; the primary's WAIT count is printed after
# each run. Prints one line per run.
set -euo pipefail
bin=$(cd "${1:?usage: bench-acks.sh BINDIR}" && pwd)
server=$(command -v valkey-server || command -v redis-server)
cli=$(command -v valkey-cli || command -v redis-cli)
work=$(mktemp -d)
primary=18471
replica=18472
port=18470
jwt=crm-chat-local-development-secret-do-not-use
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$server" --port $primary --bind 127.0.0.1 --save "" --appendonly no --dir "$work" --loglevel warning &
pids+=($!)
sleep 0.5
"$server" --port $replica --bind 127.0.0.1 --save "" --appendonly no --dir "$work" --loglevel warning \
  --replicaof 127.0.0.1 $primary --repl-diskless-sync-delay 0 &
pids+=($!)
for _ in $(seq 100); do
  "$cli" -p $replica INFO replication | grep -q 'master_link_status:up' && break
  sleep 0.1
done

waits() { "$cli" -p $primary INFO commandstats | sed -n 's/^cmdstat_wait:calls=\([0-9]*\),.*/\1/p' | tr -d '\r'; }

run() { # ack_replicas, scenario
  local acks=$1 scenario=$2
  "$cli" -p $primary FLUSHALL >/dev/null
  env CHAT_SERVER__LISTEN=127.0.0.1:$port CHAT_LOG__LEVEL=warn CHAT_VALKEY__URL=redis://127.0.0.1:$primary/0 \
    CHAT_VALKEY__ACK_REPLICAS="$acks" CHAT_LIMITS__SEND_PER_S=100000 CHAT_LIMITS__SEND_BURST=100000 \
    CHAT_LIMITS__MAX_CONNECTIONS=20000 "$bin/crm-chat" >"$work/server.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  local before
  before=$(waits)
  # shellcheck disable=SC2086
  out=$("$bin/crm-chat-load" $scenario --url "http://127.0.0.1:$port" --jwt-secret "$jwt" --server-pid "$pid")
  echo "ack_replicas=$acks scenario=[$scenario] WAITs=$(($(waits) - ${before:-0}))"
  echo "  $out"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

for scenario in "fanout --members 1000 --senders 10 --messages 2000 --rate 200" "pairs --pairs 50 --duration-s 10"; do
  run 0 "$scenario"
  run 1 "$scenario"
done
