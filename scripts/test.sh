#!/usr/bin/env bash
# `make test`: unit tests, then the integration tests against the emulators, which this script
# starts and always stops (also when a test fails or the run is interrupted).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

FEATURES="--features logflow-integration-tests/emulator-tests"

echo "== build (once, for every test below)"
# Every target the tests run, not the benchmarks (`make lint` type-checks those; building them
# here would only cost time and disk).
cargo build --workspace --lib --bins --tests --examples $FEATURES --locked

echo "== unit tests"
cargo test --workspace --exclude logflow-integration-tests --locked

echo "== integration tests against the emulators"
trap 'scripts/emulators.sh stop' EXIT
scripts/emulators.sh start
eval "$(scripts/emulators.sh env)"
# --workspace keeps feature unification identical to the build above (no rebuild).
if ! cargo test --workspace $FEATURES --locked --test emulators; then
  # A shared emulator that dies mid-run fails every test after it: name it, so that those
  # failures are read as its absence.
  states="$(scripts/emulators.sh status)"
  for name in pubsub gcs bigquery; do
    if echo "$states" | grep -q "^$name: \(stopped\|not answering\)"; then
      log="${LOGFLOW_EMULATOR_DIR:-$ROOT/.emulators}/logs/$name.log"
      echo "== the $name emulator stopped answering during the tests ($(echo "$states" | grep "^$name:")): the tests that ran after that failed without it." >&2
      echo "   $log ends as below (a crash may leave no line there; the kernel log names a segfault):" >&2
      tail -n 15 "$log" >&2 || true
    fi
  done
  exit 1
fi
