#!/usr/bin/env bash
# The webhook drain (BENCHMARKS.md, "Durable engine and webhooks against their
# floors"):
#   bash scripts/bench-webhooks-drain.sh BINDIR
# BINDIR holds release builds of crm-chat and crm-chat-load. Runs
# `pairs --pairs 50 --duration-s 10` on a fresh embedded server with every
# message.created going to nginx answering 204, then waits for the backlog to
# drain with no chat load and prints the drain rate and the CPU per event of
# the server and of the nginx worker (from /proc/PID/stat). 127.0.0.1 only.
set -euo pipefail
# shellcheck source=scripts/lib/sink.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/sink.sh"
bin=$(cd "${1:?usage: bench-webhooks-drain.sh BINDIR}" && pwd)
work=$(mktemp -d)
port=18800
sink_port=18391
pid=
cleanup() {
  if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; fi
  stop_sink "$work"
  if [[ -n ${KEEP:-} ]]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
start_sink "$work" "$sink_port"
ulimit -n 20000
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
env CHAT_SERVER__LISTEN=127.0.0.1:$port CHAT_CHAT__DATA_DIR=memory CHAT_LOG__LEVEL=warn CHAT_SERVER__DRAIN_S=1 \
  CHAT_LIMITS__SEND_PER_S=100000 CHAT_LIMITS__SEND_BURST=100000 CHAT_LIMITS__CONNECTIONS_PER_USER=100 \
  CHAT_LIMITS__SEND_BYTES_PER_S=1073741824 CHAT_LIMITS__SEND_BYTES_BURST=1073741824 \
  CHAT_WEBHOOKS__URL=http://127.0.0.1:$sink_port/hook CHAT_WEBHOOKS__SECRET=bench-webhook-secret-0123456789abcdef \
  "$bin/crm-chat" >"$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
"$bin/crm-chat-load" pairs --pairs 50 --duration-s 10 --url "http://127.0.0.1:$port" \
  --jwt-secret crm-chat-local-development-secret-do-not-use --server-pid "$pid"
ng=$(pgrep -f "nginx: worker" -P "$(cat "$work/nginx.pid")" | head -1)
m() { curl -fs "http://127.0.0.1:$port/metrics" | awk -v k="$1" '$0 ~ "^"k {s+=$2} END {print s+0}'; }
d0=$(m chat_webhooks_delivered_total) s0=$(ticks "$pid") n0=$(ticks "$ng") t0=$(date +%s.%N)
queued=$(m chat_webhooks_queued_total)
for _ in $(seq 600); do
  d=$(m chat_webhooks_delivered_total) dropped=$(m chat_webhooks_dropped_total)
  [[ $((d + dropped)) -ge $queued ]] && break
  sleep 0.2
done
t1=$(date +%s.%N) s1=$(ticks "$pid") n1=$(ticks "$ng")
tick=$(getconf CLK_TCK)
python3 -c "
n = $d - $d0; t = $t1 - $t0
print(f'queued={$queued} dropped={$dropped} drained={n} in {t:.1f} s: {n / t:.0f}/s; '
      f'server {($s1 - $s0) * 1e6 / $tick / max(n, 1):.1f} us/event, nginx {($n1 - $n0) * 1e6 / $tick / max(n, 1):.1f} us/event')"
