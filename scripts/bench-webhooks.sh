#!/usr/bin/env bash
# Webhook benchmarks (BENCHMARKS.md, "Webhooks (issue 12)"):
#   bash scripts/bench-webhooks.sh BINDIR
# BINDIR holds release builds of crm-chat and crm-chat-load
# (`cargo build --release --workspace`: target/release). Needs nginx (the fast
# receiver: `return 204`, one access-log line per event).
#
# For each of: webhooks off, on with a receiver answering 204 at once, on with
# the receiver down (connections refused), a fresh embedded-engine server runs
# `fanout --members 1000 --senders 10 --messages 2000 --rate 200` and
# `pairs --pairs 50 --duration-s 10`. With the receiver up it then reports how
# many events reached it and how fast (every message makes one message.created).
# Prints one line per run; traffic stays on 127.0.0.1.
set -euo pipefail
# shellcheck source=scripts/lib/sink.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/sink.sh"
bin=$(cd "${1:?usage: bench-webhooks.sh BINDIR}" && pwd)
work=$(mktemp -d)
sink_port=18391
down_port=18392
secret=bench-webhook-secret-0123456789abcdef
jwt=crm-chat-local-development-secret-do-not-use
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  stop_sink "$work"
  rm -rf "$work"
}
trap cleanup EXIT

start_sink "$work" "$sink_port"

events_seen() { if [[ -f $work/access.log ]]; then wc -l <"$work/access.log"; else echo 0; fi; }

run() { # label, webhook url (or "")
  local label=$1 url=$2 port=18390
  local env=("CHAT_SERVER__LISTEN=127.0.0.1:$port" CHAT_CHAT__DATA_DIR=memory CHAT_LOG__LEVEL=warn
    CHAT_LIMITS__SEND_PER_S=100000 CHAT_LIMITS__SEND_BURST=100000 CHAT_LIMITS__MAX_CONNECTIONS=20000)
  if [[ -n $url ]]; then env+=("CHAT_WEBHOOKS__URL=$url" "CHAT_WEBHOOKS__SECRET=$secret"); fi
  for scenario in "fanout --members 1000 --senders 10 --messages 2000 --rate 200" "pairs --pairs 50 --duration-s 10"; do
    env "${env[@]}" "$bin/crm-chat" >"$work/server.log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
    local before
    before=$(events_seen)
    local t0=$SECONDS
    # shellcheck disable=SC2086
    out=$("$bin/crm-chat-load" $scenario --url "http://127.0.0.1:$port" --jwt-secret "$jwt" --server-pid "$pid")
    local elapsed=$((SECONDS - t0))
    local metrics
    metrics=$(curl -fs "http://127.0.0.1:$port/metrics")
    local queued delivered
    queued=$(awk '/^chat_webhooks_queued_total/ {s+=$2} END {print s+0}' <<<"$metrics")
    if [[ $label == up ]]; then
      # Wait for the backlog to reach the receiver (at most 60 s).
      for _ in $(seq 600); do
        delivered=$(curl -fs "http://127.0.0.1:$port/metrics" | awk '/^chat_webhooks_delivered_total/ {s+=$2} END {print s+0}')
        [[ $delivered -ge $queued ]] && break
        sleep 0.1
      done
      local drained=$((SECONDS - t0))
      echo "webhooks=$label scenario=[$scenario] events_queued=$queued events_received=$(($(events_seen) - before)) all_delivered_after_s=$drained (load ran ${elapsed}s)"
    else
      echo "webhooks=$label scenario=[$scenario] events_queued=$queued"
    fi
    echo "  $out"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
  done
}

run off ""
run up "http://127.0.0.1:$sink_port/hook"
run down "http://127.0.0.1:$down_port/hook"
