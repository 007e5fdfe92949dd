#!/usr/bin/env bash
# Two builds side by side in one run (BENCHMARKS.md): fan-out to 1,000
# members and 50 DM pairs, alternating OLD and NEW, a fresh embedded server
# (history in memory) per run; then the v1.2 reaction storm on NEW.
#
#   bash scripts/bench-side-by-side.sh OLD_BINDIR NEW_BINDIR [ROUNDS]
#
# Each BINDIR holds a release `crm-chat` and `crm-chat-load`. Loopback only;
# every run is bounded by the load tool's --duration-s. One JSON line per run,
# prefixed with the build's name.
set -u
old=$1; new=$2; rounds=${3:-2}
S=crm-chat-local-development-secret-do-not-use
port=$((19600 + RANDOM % 200))
ulimit -n 20000
run() { # name bindir scenario args...
  local name=$1 dir=$2
  shift 2
  port=$((port + 1))
  # BENCHMARKS.md's $LIMITS: the per-user send budget out of the way (the
  # byte budget too where the build has one: an older build refuses the key).
  local bytes=()
  [[ $name == new ]] && bytes=(CHAT_LIMITS__SEND_BYTES_PER_S=1073741824 CHAT_LIMITS__SEND_BYTES_BURST=1073741824)
  env CHAT_SERVER__LISTEN=127.0.0.1:$port CHAT_CHAT__DATA_DIR=memory CHAT_LOG__LEVEL=error CHAT_SERVER__DRAIN_S=1 \
    CHAT_LIMITS__SEND_PER_S=100000 CHAT_LIMITS__SEND_BURST=100000 CHAT_LIMITS__CONNECTIONS_PER_USER=100 \
    "${bytes[@]}" "$dir/crm-chat" >/dev/null 2>&1 &
  local pid=$!
  sleep 1.5
  printf '%s ' "$name"
  "$dir/crm-chat-load" --url "http://127.0.0.1:$port" --server-pid "$pid" --jwt-secret "$S" "$@" 2>/dev/null
  kill "$pid"
  wait "$pid" 2>/dev/null
}
for _ in $(seq "$rounds"); do
  for b in old new; do
    dir=$old; [[ $b == new ]] && dir=$new
    run "$b" "$dir" --duration-s 60 fanout --members 1000 --senders 10 --messages 2000 --rate 200
    run "$b" "$dir" --duration-s 20 pairs --pairs 50
  done
done
run new "$new" --duration-s 60 reactions --members 1000 --window-ms 1000
