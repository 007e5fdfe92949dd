#!/usr/bin/env bash
# WebSocket against HTTP streaming on the same runs (BENCHMARKS.md, issue 19):
# a release build, the embedded engine in memory, one fresh server per run.
#
#   cargo build --release --workspace && bash scripts/bench-stream.sh [BINDIR]
#
# Loopback only; each run is bounded by the load tool's --duration-s.
set -u
dir=${1:-$(dirname "$0")/../target/release}
port=$((18600 + RANDOM % 200))
run() { # transport, then the load tool's arguments
  port=$((port + 1))
  CHAT_SERVER__LISTEN=127.0.0.1:$port CHAT_CHAT__DATA_DIR=memory CHAT_LOG__LEVEL=warn "$dir/crm-chat" >/dev/null 2>&1 &
  local pid=$!
  sleep 2
  "$dir/crm-chat-load" --url "http://127.0.0.1:$port" --server-pid "$pid" --transport "$@" 2>/dev/null
  kill "$pid"
  wait "$pid" 2>/dev/null
}
ulimit -n 20000
for t in ws http; do
  run "$t" conns --n 2000 --hold-s 5
  run "$t" --duration-s 60 fanout --members 100 --senders 10 --messages 2000 --rate 200
  run "$t" --duration-s 10 pairs --pairs 50
done
