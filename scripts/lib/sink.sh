# shellcheck shell=bash
# The fast webhook receiver of the webhook benchmarks: nginx answering 204 to
# POST /hook at once, one access-log line per event. Sourced by
# scripts/bench-webhooks.sh and scripts/bench-webhooks-drain.sh.
#   start_sink WORKDIR PORT   starts it (pid in WORKDIR/nginx.pid, log in WORKDIR/access.log)
#   stop_sink WORKDIR         stops it
start_sink() {
  local work=$1 port=$2
  cat >"$work/nginx.conf" <<NGINX
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log $work/access.log;
  client_body_temp_path $work/body;
  server {
    listen 127.0.0.1:$port;
    keepalive_requests 1000000;
    location /hook { return 204; }
  }
}
NGINX
  nginx -c "$work/nginx.conf"
}

stop_sink() {
  if [[ -f $1/nginx.pid ]]; then kill "$(cat "$1/nginx.pid")" 2>/dev/null || true; fi
}
