#!/usr/bin/env bash
# Start (or stop) a real MLflow tracking server for mor_megatron jobs.
#
# Usage:
#   tools/mlflow_server.sh [--dir DIR] [--host HOST] [--port PORT] [--wait SECONDS]
#   tools/mlflow_server.sh --stop [--dir DIR]
#
#   --dir DIR      where the server keeps its state (default: ./mlflow_server):
#                    DIR/mlflow.db    sqlite backend store
#                    DIR/artifacts/   artifact store (served through the server: mlflow-artifacts:/...)
#                    DIR/server.log   server stdout/stderr
#                    DIR/server.pid   process-group id, used by --stop
#   --host HOST    interface to bind (default 127.0.0.1, loopback only). For a multi-node job use 0.0.0.0 and
#                  point the workers at the head node's private IP; a *hostname* in the URI is refused with
#                  HTTP 403 unless listed in MLFLOW_SERVER_ALLOWED_HOSTS (e.g. "gpu-head-01:*").
#   --port PORT    port (default 5000).
#   --wait SECONDS bounded wait for GET /health (default 90; a cold start with a fresh DB takes 5-15 s,
#                  longer on a busy machine).
#   --stop         stop the server recorded in DIR/server.pid (SIGTERM to its process group).
#
# On success it prints the line to export, e.g.
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
# and exits 0 with the server left running in its own session (setsid), so killing this shell does not
# stop it. It exits 1 if the server does not answer /health in time (the log tail is printed, and the
# server is stopped).
#
# The server runs with one worker and MLflow's job runner off (2 processes, ~0.5 GB instead of ~15 and
# ~3 GB). Environment: MLFLOW_BIN (default: <repo>/.venv/bin/mlflow if present, else `mlflow` on PATH).
set -euo pipefail

dir="./mlflow_server"
host="127.0.0.1"
port="5000"
wait_s="90"
action="start"

# Help text: the comment block at the top of this file, without the '# ' prefix.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --wait) wait_s="$2"; shift 2 ;;
    --stop) action="stop"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "mlflow_server.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
pid_file="$dir/server.pid"

stop_server() {
  if [[ ! -f "$pid_file" ]]; then
    echo "mlflow_server.sh: no $pid_file; nothing to stop" >&2
    return 1
  fi
  local pgid
  pgid="$(cat "$pid_file")"
  # The server's workers are children of the `mlflow` process; signal the whole group or they stay up.
  kill -TERM -- "-$pgid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 -- "-$pgid" 2>/dev/null || { rm -f "$pid_file"; return 0; }
    sleep 0.2
  done
  kill -KILL -- "-$pgid" 2>/dev/null || true
  rm -f "$pid_file"
}

if [[ "$action" == "stop" ]]; then
  stop_server
  exit $?
fi

if [[ -n "${MLFLOW_BIN:-}" ]]; then
  mlflow_bin="$MLFLOW_BIN"
else
  script_dir="$(cd "$(dirname "$0")" && pwd)"
  mlflow_bin="$script_dir/../.venv/bin/mlflow"
  [[ -x "$mlflow_bin" ]] || mlflow_bin="mlflow"
fi

if [[ -f "$pid_file" ]] && kill -0 -- "-$(cat "$pid_file")" 2>/dev/null; then
  echo "mlflow_server.sh: a server from $pid_file is already running (stop it with --stop --dir $dir)" >&2
  exit 1
fi

mkdir -p "$dir/artifacts"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$mlflow_bin" server \
  --backend-store-uri "sqlite:///$dir/mlflow.db" \
  --artifacts-destination "$dir/artifacts" \
  --host "$host" --port "$port" --workers 1 \
  >"$dir/server.log" 2>&1 < /dev/null &
# setsid makes the server its own process-group leader, so its pid is the group id.
echo $! > "$pid_file"

# /health probe: curl when present, else the venv's python (next to the mlflow binary), else python3.
probe() {
  if command -v curl >/dev/null 2>&1; then
    curl -sf --max-time 2 "$1" >/dev/null 2>&1
  else
    local py="$(dirname "$mlflow_bin")/python"
    [[ -x "$py" ]] || py="python3"
    "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" >/dev/null 2>&1
  fi
}

probe_host="$host"
[[ "$host" == "0.0.0.0" ]] && probe_host="127.0.0.1"
deadline=$((SECONDS + wait_s))
until probe "http://$probe_host:$port/health"; do
  if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    echo "mlflow_server.sh: the server exited during startup; last lines of $dir/server.log:" >&2
    tail -n 20 "$dir/server.log" >&2
    rm -f "$pid_file"
    exit 1
  fi
  if (( SECONDS >= deadline )); then
    echo "mlflow_server.sh: no answer from http://$probe_host:$port/health within ${wait_s}s;" \
         "last lines of $dir/server.log:" >&2
    tail -n 20 "$dir/server.log" >&2
    stop_server || true
    exit 1
  fi
  sleep 0.5
done

uri_host="$host"
if [[ "$host" == "0.0.0.0" ]]; then
  # Workers on other nodes need an address they can reach; a private IP passes the Host-header check.
  uri_host="$(hostname -I 2>/dev/null | awk '{print $1}')"
  [[ -n "$uri_host" ]] || uri_host="$(hostname)"
fi
echo "mlflow_server.sh: server up (pid group $(cat "$pid_file"), state in $dir); stop with: $0 --stop --dir $dir" >&2
echo "export MLFLOW_TRACKING_URI=http://$uri_host:$port"
