#!/usr/bin/env bash
# The Autobahn WebSocket conformance cases against the session's own code:
# builds examples/autobahn_echo.rs (release), runs it, drives every case with
# kosoku (PyPI; fuzzingclient mode) from a venv under ~/.cache/crm-chat, prints
# the result table and exits non-zero when any case ended FAILED.
# Compression cases (12.*, 13.*) may end UNIMPLEMENTED: the server offers no
# permessage-deflate. Usage: bash scripts/autobahn.sh [report dir]
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${1:-$root/target/autobahn}

venv=${XDG_CACHE_HOME:-$HOME/.cache}/crm-chat/autobahn-venv
if ! "$venv/bin/kosoku" --help >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check 'kosoku'
fi

cargo build --release --locked --example autobahn_echo
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/release/examples/autobahn_echo "127.0.0.1:$port" &
echo_pid=$!
trap 'kill "$echo_pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

rm -rf "$out"
mkdir -p "$out"
# kosoku exits non-zero when any case is not OK (UNIMPLEMENTED compression
# included): the verdict is ours, from its report.
"$venv/bin/kosoku" -m fuzzingclient "127.0.0.1:$port" -o "$out" -p 2 >"$out.log" 2>&1 || true
kill -0 "$echo_pid" || { echo "the echo server died during the run" >&2; exit 1; }

python3 - "$out" <<'PY'
import collections, glob, json, os, sys
out = sys.argv[1]
index = glob.glob(os.path.join(out, "**", "index.json"), recursive=True)
if not index:
    sys.exit(f"no index.json under {out}")
report = json.load(open(index[0]))
counts = collections.defaultdict(collections.Counter)
failed = []
cases = 0
for agent, results in report.items():
    for case, r in results.items():
        cases += 1
        group = case.split(".")[0]
        b, c = r.get("behavior", "?"), r.get("behaviorClose", "?")
        counts[group][b] += 1
        if "FAILED" in (b, c):
            failed.append(f"{case}: behavior {b}, close {c}")
names = sorted({b for c in counts.values() for b in c})
print("| cases | " + " | ".join(names) + " |")
print("|---|" + "---|" * len(names))
for g in sorted(counts, key=int):
    print(f"| {g}.* | " + " | ".join(str(counts[g].get(n, 0)) for n in names) + " |")
print(f"{cases} cases, {len(failed)} FAILED")
for f in failed:
    print("FAILED", f)
sys.exit(1 if failed else 0)
PY
