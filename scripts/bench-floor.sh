#!/usr/bin/env bash
# The floor of a fan-out next to crm-chat, in one run (BENCHMARKS.md, issue 20):
# the load tool's floor-server (only the socket work: one ready frame queued to
# every member's WebSocket; one write per frame, then one writev per batch) and
# a fresh embedded crm-chat, alternating, under the same `fanout` load.
#
#   bash scripts/bench-floor.sh BINDIR [ROUNDS] [RATE]
#
# BINDIR holds release `crm-chat` and `crm-chat-load`. Loopback only; every run
# is bounded by --duration-s. One JSON line per run, prefixed with its name;
# the last lines are CPU per delivery and p99 as ratios to the floor.
set -u
dir=$1; rounds=${2:-2}; rate=${3:-200}
S=crm-chat-local-development-secret-do-not-use
port=$((19300 + RANDOM % 200))
ulimit -n 20000
out=${OUT:-$(mktemp)}
load() { # name pid port
  printf '%s ' "$1" | tee -a "$out"
  "$dir/crm-chat-load" --url "http://127.0.0.1:$3" --server-pid "$2" --jwt-secret "$S" --duration-s 60 \
    fanout --members 1000 --senders 10 --messages 2000 --rate "$rate" 2>/dev/null | tee -a "$out"
}
for _ in $(seq "$rounds"); do
  for writev in false true; do
    port=$((port + 1))
    "$dir/crm-chat-load" --jwt-secret "$S" floor-server --listen "127.0.0.1:$port" --writev "$writev" >/dev/null 2>&1 &
    pid=$!
    sleep 1
    load "floor-writev-$writev" "$pid" "$port"
    kill "$pid"; wait "$pid" 2>/dev/null
  done
  port=$((port + 1))
  env CHAT_SERVER__LISTEN=127.0.0.1:$port CHAT_CHAT__DATA_DIR=memory CHAT_LOG__LEVEL=error CHAT_SERVER__DRAIN_S=1 \
    CHAT_LIMITS__SEND_PER_S=100000 CHAT_LIMITS__SEND_BURST=100000 CHAT_LIMITS__CONNECTIONS_PER_USER=100 \
    CHAT_LIMITS__SEND_BYTES_PER_S=1073741824 CHAT_LIMITS__SEND_BYTES_BURST=1073741824 \
    "$dir/crm-chat" >/dev/null 2>&1 &
  pid=$!
  sleep 1.5
  load crm-chat "$pid" "$port"
  kill "$pid"; wait "$pid" 2>/dev/null
done
python3 - "$out" <<'PY'
import json, sys, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, _, j = line.partition(' ')
    try:
        d = json.loads(j)
    except ValueError:
        continue
    runs[name].append((d['cpu']['server_cpu_s'] * 1e6 / max(d['delivered'], 1), d['latency']['p99_ms'], d['latency']['p50_ms']))
avg = lambda xs: sum(xs) / len(xs)
floor = runs.get('floor-writev-false') or []
for name, rs in runs.items():
    cpu, p99, p50 = avg([r[0] for r in rs]), avg([r[1] for r in rs]), avg([r[2] for r in rs])
    ratio = f"cpu x{cpu / avg([r[0] for r in floor]):.2f}, p99 x{p99 / avg([r[1] for r in floor]):.2f}" if floor else ""
    print(f"{name}: {len(rs)} runs, server CPU {cpu:.2f} us/delivery, p50 {p50:.1f} ms, p99 {p99:.1f} ms {ratio}")
PY
[[ -n ${OUT:-} ]] || rm -f "$out"
