#!/usr/bin/env bash
# Start, stop and watch the sam3studio server (web UI at /, REST API at /v1).
#
#   scripts/start-sam3.sh start|stop|restart|status|logs [-f]
#
# Settings (environment): SAM3_MODEL (demo), SAM3_PRECISION (auto), SAM3_HOST (127.0.0.1),
# SAM3_PORT (7860), SAM3_OFFLINE (0), HF_HOME; SAM3_RUN_DIR (.run: pid and log files),
# SAM3_MAX_RESTARTS (5), SAM3_START_TIMEOUT (600 s), SAM3_PYTHON (.venv/bin/python).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${SAM3_PYTHON:-$repo/.venv/bin/python}"
run_dir="${SAM3_RUN_DIR:-$repo/.run}"
host="${SAM3_HOST:-127.0.0.1}"
port="${SAM3_PORT:-7860}"
pid_file="$run_dir/supervisor.pid"
child_file="$run_dir/server.pid"
log_file="$run_dir/server.log"
max_restarts="${SAM3_MAX_RESTARTS:-5}"
url="http://$host:$port"

die() { echo "start-sam3: $*" >&2; exit 1; }

running_pid() {  # the supervisor's pid if it is alive
  [ -f "$pid_file" ] || return 1
  local pid; pid="$(cat "$pid_file")"
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

check_dependencies() {
  [ -x "$python" ] || die "no Python at $python: run 'bash scripts/setup.sh' first (or set SAM3_PYTHON)."
  "$python" - <<'PY' || die "dependencies missing or too old (see above): run 'bash scripts/setup.sh'."
import sys
if sys.version_info < (3, 11):
    sys.exit(f"Python {sys.version.split()[0]} is too old: 3.11 or newer is needed.")
missing = []
for name in ("torch", "transformers", "gradio", "fastapi", "uvicorn", "sam3studio"):
    try:
        module = __import__(name)
        print(f"  {name} {getattr(module, '__version__', '')}")
    except ImportError as exc:
        missing.append(f"{name} ({exc})")
if missing:
    sys.exit("missing: " + ", ".join(missing))
PY
}

ready() { "$python" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('$url/readyz', timeout=2).status != 200)" 2>/dev/null; }

load_error() {  # the model's load error, once /readyz reports one
  "$python" - "$url/readyz" <<'PY' 2>/dev/null
import json, sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError as exc:
    body = json.loads(exc.read() or b"{}")
    if body.get("status") == "failed":
        print(body.get("error"))
except OSError:
    pass  # not listening yet
PY
}

supervise() {  # runs in the background: start the server, restart it when it dies, stop on TERM
  local restarts=0 child=""
  trap '[ -n "$child" ] && kill "$child" 2>/dev/null; wait 2>/dev/null; rm -f "$child_file"; exit 0' TERM INT
  while true; do
    local started=$SECONDS
    "$python" -m sam3studio.cli serve --host "$host" --port "$port" >>"$log_file" 2>&1 &
    child=$!
    echo "$child" > "$child_file"
    set +e; wait "$child"; status=$?; set -e
    # A server that ran for 10 minutes was healthy: its crash starts a new count.
    [ $((SECONDS - started)) -lt 600 ] || restarts=0
    restarts=$((restarts + 1))
    if [ "$restarts" -gt "$max_restarts" ]; then
      echo "$(date -Is) server exited ($status) $restarts times; giving up" >>"$log_file"
      rm -f "$child_file" "$pid_file"; exit 1
    fi
    echo "$(date -Is) server exited ($status); restart $restarts of $max_restarts" >>"$log_file"
    sleep $((restarts < 5 ? restarts : 5))
  done
}

start() {
  mkdir -p "$run_dir"
  exec 9>"$run_dir/start.lock"  # two starts at once: the second waits for none, it refuses
  flock -n 9 || die "another start is in progress."
  if pid="$(running_pid)"; then die "already running (pid $pid) at $url; '$0 stop' first."; fi
  echo "checking dependencies:"
  check_dependencies
  echo "$(date -Is) starting: model ${SAM3_MODEL:-demo}, precision ${SAM3_PRECISION:-auto}, $url" >>"$log_file"
  nohup "$0" __supervise >/dev/null 2>&1 9>&- &
  echo $! > "$pid_file"
  local deadline=$((SECONDS + ${SAM3_START_TIMEOUT:-600}))
  until ready; do
    running_pid >/dev/null || die "the server stopped while starting; see $log_file"
    error="$(load_error || true)"
    if [ -n "$error" ]; then stop >/dev/null; die "the model could not be loaded: $error"; fi
    [ "$SECONDS" -lt "$deadline" ] || die "not ready after ${SAM3_START_TIMEOUT:-600} s; see $log_file"
    sleep 1
  done
  echo "ready at $url (logs: $log_file)"
}

server_pid() {  # the server's pid if it is alive and still our server (pids are reused)
  local child; child="$(cat "$child_file" 2>/dev/null)" || return 1
  grep -qs "sam3studio.cli" "/proc/$child/cmdline" && echo "$child"
}

stop() {
  if ! pid="$(running_pid)"; then echo "not running"; rm -f "$pid_file" "$child_file"; return 0; fi
  local child; child="$(server_pid || true)"
  kill "$pid"  # the supervisor passes TERM on; the server finishes open requests for at most 5 s
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || { [ -n "$child" ] && kill -0 "$child" 2>/dev/null; } || break
    sleep 0.2
  done
  # Killing only the supervisor would leave its server running, model loaded, with no pid file.
  kill -9 "$pid" ${child:+"$child"} 2>/dev/null || true
  rm -f "$pid_file" "$child_file"
  echo "stopped"
}

status() {
  if pid="$(running_pid)"; then
    if ready; then echo "running (pid $pid, server $(cat "$child_file" 2>/dev/null)) and ready at $url"
    else echo "running (pid $pid), not ready yet at $url"; fi
  else
    echo "not running"; return 3
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) status ;;
  logs) if [ "${2:-}" = "-f" ]; then tail -n 50 -f "$log_file"; else tail -n 100 "$log_file"; fi ;;
  __supervise) supervise ;;
  *) echo "usage: $0 start|stop|restart|status|logs [-f]" >&2; exit 2 ;;
esac
