#!/usr/bin/env bash
# `make demo`: logflow end to end on the local emulators, in about a minute.
#   1. installs and starts the Pub/Sub, GCS and BigQuery emulators;
#   2. creates three topics with a subscription each, two buckets and a dataset;
#   3. starts the worker with deploy/examples/demo.yaml;
#   4. publishes sample HTTP access logs, payment events and auth events (2% malformed);
#   5. waits until every message is archived and in BigQuery or the dead-letter path;
#   6. stops the worker with SIGTERM and prints what landed where, and the backlog left;
#   7. stops everything it started.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CONFIG="deploy/examples/demo.yaml"
PER_TYPE="${DEMO_MESSAGES_PER_TYPE:-1000}"
LOGFLOW="${LOGFLOW_BIN:-$ROOT/target/debug/logflow}"
DEMO_DIR="$ROOT/.emulators/demo"
WORKER_PID=""

cleanup() {
  if [ -n "$WORKER_PID" ] && kill -0 "$WORKER_PID" 2>/dev/null; then
    kill -TERM "$WORKER_PID" 2>/dev/null || true
    wait "$WORKER_PID" 2>/dev/null || true
  fi
  scripts/emulators.sh stop
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

step "building logflow"
cargo build --quiet -p logflow

step "starting the emulators"
scripts/emulators.sh start
eval "$(scripts/emulators.sh env)"
PROJECT="$LOGFLOW_PROJECT"
PS="http://$PUBSUB_EMULATOR_HOST/v1/projects/$PROJECT"
JSON='Content-Type: application/json'

step "creating topics, subscriptions, buckets and the dataset"
for t in http-access-logs payment-events auth-events; do
  curl -sf -X PUT "$PS/topics/$t" >/dev/null
  curl -sf -X PUT -H "$JSON" "$PS/subscriptions/$t-logflow" \
    -d "{\"topic\": \"projects/$PROJECT/topics/$t\", \"ackDeadlineSeconds\": 10}" >/dev/null
done
for b in acme-logs-raw acme-logs-dead-letter; do
  curl -sf -X POST -H "$JSON" "$STORAGE_EMULATOR_HOST/storage/v1/b?project=$PROJECT" -d "{\"name\": \"$b\"}" >/dev/null
done
curl -sf -X POST -H "$JSON" "$BIGQUERY_EMULATOR_HOST/bigquery/v2/projects/$PROJECT/datasets" \
  -d "{\"datasetReference\": {\"projectId\": \"$PROJECT\", \"datasetId\": \"logs\"}}" >/dev/null

step "starting the worker ($CONFIG)"
mkdir -p "$DEMO_DIR"
"$LOGFLOW" run --config "$CONFIG" > "$DEMO_DIR/worker.log" 2>&1 &
WORKER_PID=$!

step "publishing $PER_TYPE messages of each type, 2% malformed"
seed=1
for pair in http-access-logs:acme.http.v1.HttpAccessLog payment-events:acme.payments.v1.PaymentEvent \
            auth-events:acme.auth.v1.AuthEvent; do
  "$LOGFLOW" publish --topic "${pair%%:*}" --message-type "${pair#*:}" --count "$PER_TYPE" \
    --malformed-fraction 0.02 --seed $((seed++))
done
TOTAL=$((PER_TYPE * 3))

step "waiting until all $TOTAL messages are archived and in BigQuery or the dead-letter path"
deadline=$((SECONDS + 180))
while :; do
  "$LOGFLOW" inspect --config "$CONFIG" > "$DEMO_DIR/summary.txt" 2>>"$DEMO_DIR/inspect.log" || true
  read -r archived landed < <(awk 'NR > 1 { a += $5; l += ($3 - $4) + $7 } END { print a + 0, l + 0 }' "$DEMO_DIR/summary.txt")
  printf '  archived %s/%s, in BigQuery or dead-lettered %s/%s\n' "$archived" "$TOTAL" "$landed" "$TOTAL"
  if [ "$archived" -ge "$TOTAL" ] && [ "$landed" -ge "$TOTAL" ]; then break; fi
  if ! kill -0 "$WORKER_PID" 2>/dev/null; then
    tail -n 30 "$DEMO_DIR/worker.log"; echo "the worker exited early (log: $DEMO_DIR/worker.log)" >&2; exit 1
  fi
  if [ $SECONDS -ge $deadline ]; then
    tail -n 30 "$DEMO_DIR/worker.log"; echo "timed out (log: $DEMO_DIR/worker.log)" >&2; exit 1
  fi
  sleep 2
done

step "stopping the worker (SIGTERM: flush, ack, exit)"
kill -TERM "$WORKER_PID"
wait "$WORKER_PID" && echo "  worker exited 0" || { echo "  worker exited $?" >&2; exit 1; }
WORKER_PID=""

step "summary"
"$LOGFLOW" inspect --config "$CONFIG"
echo
for t in http-access-logs payment-events auth-events; do
  left=$(curl -sf -X POST -H "$JSON" "$PS/subscriptions/$t-logflow:pull" \
    -d '{"maxMessages": 1000, "returnImmediately": true}' | { grep -o '"ackId"' || true; } | wc -l)
  echo "backlog left on $t-logflow: $left"
done
echo
echo "rows     : rows in the BigQuery table (queried), dups: rows beyond one per message id"
echo "archived : messages in the raw-archive Parquet objects; dead: messages in dead-letter JSONL"
echo "worker log: $DEMO_DIR/worker.log"

step "data catalog of the sample schemas (logflow catalog)"
"$LOGFLOW" catalog --config "$CONFIG"
