#!/usr/bin/env bash
# `make test`: unit tests, then the integration tests against the emulators, which this script
# starts and always stops (also when a test fails or the run is interrupted).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

FEATURES="--features logflow-integration-tests/emulator-tests"

echo "== build (once, for every test below)"
cargo build --workspace --all-targets $FEATURES --locked

echo "== unit tests"
cargo test --workspace --exclude logflow-integration-tests --locked

echo "== integration tests against the emulators"
trap 'scripts/emulators.sh stop' EXIT
scripts/emulators.sh start
eval "$(scripts/emulators.sh env)"
# --workspace keeps feature unification identical to the build above (no rebuild).
cargo test --workspace $FEATURES --locked --test emulators
