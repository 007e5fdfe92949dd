#!/usr/bin/env bash
# The pod as Kubernetes would run it: render the Helm chart with release name
# `chat` (so the Service is `chat-crm-chat`, whose service-link variables
# CHAT_CRM_CHAT_* look like settings), then run the image with Docker exactly
# as the rendered chat container says (env, command/args, probes, ports,
# securityContext, mounts), plus those service-link variables, and check the
# probes, the two listeners, a chat and the shutdown (scripts/pod-test.py).
# Also checks that the image with no settings at all refuses to start and
# says how to set the secrets.
#
#   bash scripts/pod-test.sh [--no-build] [VALUES_FILE ...]
#
# Without VALUES_FILE: the chart's default values and
# helm/test-values/all-features.yaml (bundled Valkey, secrets as files, ...).
# Needs a Docker engine, python3 with venv, and helm (like scripts/lint-dist.sh:
# $HELM, its cache, or ../shared/tools/get-helm.sh). PyYAML and websockets go
# into a venv in the cache (PyPI, first run only).
#
# Environment:
#   CRM_CHAT_IMAGE        image to test (default crm-chat:dev); built from the
#                         Dockerfile first unless --no-build
#   CRM_CHAT_SHARED       the shared directory (default ../shared)
#   CRM_CHAT_POD_TEST_KEEP=1  keep the containers (debugging)
# Every container and network gets the label org.crm-chat.pod-test=<run id>
# and is removed on exit, whatever happened.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
shared=${CRM_CHAT_SHARED:-$root/../shared}
image=${CRM_CHAT_IMAGE:-crm-chat:dev}
cache=${XDG_CACHE_HOME:-$HOME/.cache}
lint_cache=${CRM_CHAT_LINT_CACHE:-$cache/crm-chat-lint}
venv=$cache/crm-chat-pod-test/venv
chart=helm/crm-chat
release=chat
namespace=crm-chat

build=1
values=()
for arg in "$@"; do
  case $arg in
    --no-build) build=0 ;;
    -h | --help)
      sed -n '2,/^set -e/{/^#/s/^# \{0,1\}//p}' "$0"
      exit 0
      ;;
    -*)
      echo "pod-test: unknown option $arg" >&2
      exit 2
      ;;
    *) values+=("$arg") ;;
  esac
done
[[ ${#values[@]} -gt 0 ]] || values=("" helm/test-values/all-features.yaml)

step() { printf '\n=== pod-test: %s (%ss)\n' "$*" "$SECONDS"; }

if ! docker info >/dev/null 2>&1; then
  echo "pod-test: no Docker engine answers 'docker info'" >&2
  exit 1
fi

run_id=$$-$RANDOM
tmp=$(mktemp -d)
cleanup() {
  local rc=$?
  if [[ ${CRM_CHAT_POD_TEST_KEEP:-0} == 1 ]]; then
    echo "pod-test: CRM_CHAT_POD_TEST_KEEP=1: containers labelled org.crm-chat.pod-test=$run_id kept"
  else
    local ids
    ids=$(docker ps -aq --filter "label=org.crm-chat.pod-test=$run_id" 2>/dev/null || true)
    if [[ -n $ids ]]; then
      # shellcheck disable=SC2086 # one id per word
      docker rm -f $ids >/dev/null 2>&1 || true
    fi
    ids=$(docker network ls -q --filter "label=org.crm-chat.pod-test=$run_id" 2>/dev/null || true)
    if [[ -n $ids ]]; then
      # shellcheck disable=SC2086
      docker network rm $ids >/dev/null 2>&1 || true
    fi
  fi
  rm -rf "$tmp"
  if ((rc == 0)); then step passed; else step "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools ---------------------------------------------------------------------

if [[ -n ${HELM:-} ]]; then
  helm_bin=$HELM
elif [[ -x $lint_cache/bin/helm ]]; then
  helm_bin=$lint_cache/bin/helm
elif command -v helm >/dev/null 2>&1; then
  helm_bin=$(command -v helm)
elif [[ -f $shared/tools/get-helm.sh ]]; then
  step "helm: $shared/tools/get-helm.sh $lint_cache/bin"
  bash "$shared/tools/get-helm.sh" "$lint_cache/bin" >/dev/null
  helm_bin=$lint_cache/bin/helm
else
  echo "pod-test: helm not found: set HELM, or provide $shared/tools/get-helm.sh" >&2
  exit 2
fi

if ! "$venv/bin/python" -c 'import yaml, websockets.sync.client' 2>/dev/null; then
  step "python venv with PyYAML and websockets ($venv)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check 'pyyaml>=6,<7' 'websockets>=13,<18'
fi

if ((build)); then
  if [[ -f $shared/containers/offline-images.sh ]]; then
    step "base images: $shared/containers/offline-images.sh"
    bash "$shared/containers/offline-images.sh"
  fi
  step "docker build -t $image ."
  timeout 3600 docker build -q -t "$image" . >/dev/null
fi
docker image inspect "$image" >/dev/null

# --- the image on its own --------------------------------------------------------

step "image defaults: production profile, two listeners"
cfg=$(docker image inspect -f '{{json .Config.Env}} {{json .Config.ExposedPorts}} {{.Config.User}}' "$image")
for want in '"CHAT_PROFILE=production"' '"CHAT_SERVER__INTERNAL_LISTEN=0.0.0.0:9090"' '"8000/tcp"' '"9090/tcp"' ' 65532:65532'; do
  if [[ $cfg != *"$want"* ]]; then
    echo "pod-test: the image config lacks $want: $cfg" >&2
    exit 1
  fi
done
echo "   ok: $cfg"

step "the image with no settings refuses to start and says how to set the secrets"
set +e
timeout 30 docker run --rm --name "podtest-$run_id-bare" --label "org.crm-chat.pod-test=$run_id" \
  --read-only --user 65532:65532 --cap-drop ALL --security-opt no-new-privileges \
  "$image" >"$tmp/bare.log" 2>&1
rc=$?
set -e
sed 's/^/   | /' "$tmp/bare.log" | head -n 20
if ((rc == 0 || rc == 124)); then
  echo "pod-test: the image started without secrets (exit $rc; 124: still running after 30 s)" >&2
  exit 1
fi
if ! grep -q 'CHAT_AUTH__JWT_SECRET' "$tmp/bare.log"; then
  echo "pod-test: exit $rc, but the log does not say how to set the JWT secret (CHAT_AUTH__JWT_SECRET)" >&2
  exit 1
fi
echo "   ok: exit $rc, and the log says which variable to set"

# --- the rendered chart ------------------------------------------------------------

for v in "${values[@]}"; do
  name=$(basename "${v:-default}" .yaml)
  step "helm template $release $chart ${v:+-f $v} | run the chat pod ($name)"
  args=(template "$release" "$chart" --namespace "$namespace")
  [[ -n $v ]] && args+=(-f "$v")
  "$helm_bin" "${args[@]}" >"$tmp/render-$name.yaml"
  mkdir -p "$tmp/$name"
  timeout 600 "$venv/bin/python" scripts/pod-test.py --image "$image" --rendered "$tmp/render-$name.yaml" \
    --release "$release" --namespace "$namespace" --run-id "$run_id" --name "$name" --tmp "$tmp/$name"
done
