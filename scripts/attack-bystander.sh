#!/usr/bin/env bash
# A bystander's latency while one attack of scripts/attack.py runs (BENCHMARKS.md,
# "A bystander while each attack runs"). Loopback only, bounded in time.
#
#   bash scripts/attack-bystander.sh BINDIR none|history|junk|slowloris|reconnect|typing|biggroup|fatbodies|churn
#
# VALKEY=redis://127.0.0.1:PORT runs the server on that Valkey (the Valkey
# engine) instead of the embedded engine; EXTRA="CHAT_X=y ..." adds settings.
# BINDIR holds a release `crm-chat`; the load tool is target/release/crm-chat-load
# (or $LOAD). attack.py needs `websockets` and `pyjwt` in $PYTHON (default python3).
# Prints one JSON line: the attack's figures and the bystander's ack latency.
set -u
dir=$1; sc=$2
out=$(mktemp -d)
ulimit -n 20000
port=$((19000 + RANDOM % 500))
iport=$((port + 500))
engine=()
[[ -n ${VALKEY:-} ]] && engine=(CHAT_VALKEY__URL="$VALKEY" CHAT_VALKEY__KEY_PREFIX="bench$RANDOM")
# shellcheck disable=SC2086
env CHAT_SERVER__DRAIN_S=1 CHAT_LOG__LEVEL=error CHAT_LIMITS__CONNECTIONS_PER_USER=100 CHAT_CHAT__DATA_DIR=memory \
  CHAT_SERVER__LISTEN=127.0.0.1:$port CHAT_SERVER__INTERNAL_LISTEN=127.0.0.1:$iport "${engine[@]}" ${EXTRA:-} \
  "$dir/crm-chat" >"$out/server.log" 2>&1 &
pid=$!; sleep 1
S=crm-chat-local-development-secret-do-not-use
if [[ $sc != none ]]; then
  timeout 60 "${PYTHON:-python3}" "$(dirname "$0")/attack.py" --url http://127.0.0.1:$port --pid $pid --secret $S --api http://127.0.0.1:$iport --scenario "$sc" --seconds 16 > "$out/attack.json" 2>"$out/attack.err" &
  ap=$!
  sleep 3
else
  echo '{}' > "$out/attack.json"; ap=
fi
timeout 40 "${LOAD:-$(dirname "$0")/../target/release/crm-chat-load}" fanout --jwt-secret $S --url http://127.0.0.1:$port --members 10 --senders 1 --messages 100 --rate 10 --prefix by$RANDOM 2>/dev/null > "$out/bystander.json"
[[ -n $ap ]] && wait $ap
alive=$(kill -0 $pid 2>/dev/null && echo up || echo DOWN)
python3 - "$sc" "$alive" "$out" <<'PY'
import json, os, sys
sc, alive, out = sys.argv[1:4]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception as e:
        return {"error": str(e)}
a, b = load("attack.json"), load("bystander.json")
print(json.dumps({"scenario": sc, "server": alive, "attack": a,
                  "bystander_ack_p50_ms": b.get("ack_latency", {}).get("p50_ms"),
                  "bystander_ack_p99_ms": b.get("ack_latency", {}).get("p99_ms"),
                  "bystander_delivery_p99_ms": b.get("latency", {}).get("p99_ms"),
                  "acked": b.get("acked"), "lost": b.get("lost"), "errors": b.get("errors", b.get("error"))}))
PY
kill $pid 2>/dev/null; wait $pid 2>/dev/null
rm -rf "$out"
