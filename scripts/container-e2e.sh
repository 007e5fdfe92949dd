#!/usr/bin/env bash
# Container end-to-end test: build the image, start the compose stack (nginx,
# two crm-chat replicas, Valkey) as its own compose project, run
# tests/container.rs against it through nginx (its public side for the
# WebSocket and dev tokens, its internal side for /readyz and the service
# API), and always tear it down.
#
#   bash scripts/container-e2e.sh
#
# Needs a Docker engine and docker-compose (v1.29) or `docker compose` (v2).
# On a machine with no image registry, the base images come from
# ../shared/containers/offline-images.sh (run first when it exists).
#
# Environment:
#   CHAT_HTTP_PORT             host port of nginx's public side (default 8080)
#   CHAT_INTERNAL_PORT         host port of nginx's internal side (default 8081)
#   CHAT_NET_SUBNET            the stack's network (default 172.29.241.0/24, not
#                              compose.yaml's, so a developer's own stack can run)
#   CHAT_HA_NET_SUBNET         the ha profile's network, created by compose even
#                              when the profile is off (default 172.29.243.0/24,
#                              apart from the above and from compose.yaml's)
#   CHAT_E2E_COMPOSE_PROJECT   compose project name (default crm-chat-e2e)
#   CRM_CHAT_SHARED            the shared directory (default ../shared)
#   CRM_CHAT_E2E_KEEP=1        leave the stack running afterwards (debugging)
# A `.env` beside compose.yaml is ignored: the test runs the local profile.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
shared=${CRM_CHAT_SHARED:-$root/../shared}

export CHAT_HTTP_PORT=${CHAT_HTTP_PORT:-8080}
export CHAT_INTERNAL_PORT=${CHAT_INTERNAL_PORT:-8081}
# Loopback only, whatever the caller's environment says.
export CHAT_BIND=127.0.0.1
export CHAT_NET_SUBNET=${CHAT_NET_SUBNET:-172.29.241.0/24}
export CHAT_HA_NET_SUBNET=${CHAT_HA_NET_SUBNET:-172.29.243.0/24}
export CHAT_E2E_COMPOSE_PROJECT=${CHAT_E2E_COMPOSE_PROJECT:-crm-chat-e2e}
url=http://127.0.0.1:$CHAT_HTTP_PORT
internal_url=http://127.0.0.1:$CHAT_INTERNAL_PORT

step() { printf '\n=== container-e2e: %s (%ss)\n' "$*" "$SECONDS"; }

if ! docker info >/dev/null 2>&1; then
  echo "container-e2e: no Docker engine answers 'docker info'" >&2
  exit 1
fi
if command -v docker-compose >/dev/null 2>&1; then
  compose_cmd=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
else
  echo "container-e2e: neither docker-compose nor 'docker compose' is installed" >&2
  exit 1
fi

tmp=$(mktemp -d)
# An empty env file: compose.yaml's defaults, not a developer's .env.
: >"$tmp/empty.env"
compose() {
  "${compose_cmd[@]}" --env-file "$tmp/empty.env" -f compose.yaml -p "$CHAT_E2E_COMPOSE_PROJECT" "$@"
}

started=0
finish() {
  local rc=$?
  if ((started)); then
    if ((rc != 0)); then
      step "FAILED (exit $rc): compose ps and the last 100 log lines of each service"
      compose ps || true
      compose logs --no-color --tail=100 || true
    fi
    if [[ ${CRM_CHAT_E2E_KEEP:-0} == 1 ]]; then
      step "CRM_CHAT_E2E_KEEP=1: stack left running (${compose_cmd[*]} -p $CHAT_E2E_COMPOSE_PROJECT down -v)"
    else
      step "compose down -v"
      compose down -v --remove-orphans || true
    fi
  fi
  rm -rf "$tmp"
  if ((rc == 0)); then
    step "passed"
  else
    step "FAILED (exit $rc)"
  fi
  exit "$rc"
}
trap finish EXIT

if [[ -f $shared/containers/offline-images.sh ]]; then
  step "base images: $shared/containers/offline-images.sh"
  bash "$shared/containers/offline-images.sh"
fi

step "compose build (${compose_cmd[*]}, project $CHAT_E2E_COMPOSE_PROJECT)"
compose build

# Leftovers of an interrupted run would hold the port and the network.
started=1
compose down -v --remove-orphans >/dev/null 2>&1 || true
for u in "$url" "$internal_url"; do
  if curl -s -o /dev/null --max-time 2 "$u/"; then
    echo "container-e2e: something already answers on $u: set CHAT_HTTP_PORT / CHAT_INTERNAL_PORT to free ports" >&2
    exit 1
  fi
done

step "compose up -d (waits for Valkey and both replicas to be healthy)"
compose up -d

step "wait for $internal_url/readyz through nginx's internal side (120 s at most)"
deadline=$((SECONDS + 120))
until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$internal_url/readyz" || true) == 200 ]]; do
  if ((SECONDS >= deadline)); then
    echo "container-e2e: $internal_url/readyz did not answer 200 within 120 s" >&2
    exit 1
  fi
  sleep 1
done
compose ps

step "cargo test --test container (CHAT_E2E_URL=$url CHAT_E2E_INTERNAL_URL=$internal_url)"
CHAT_E2E_URL=$url CHAT_E2E_INTERNAL_URL=$internal_url cargo test --locked --test container -- --ignored --nocapture
