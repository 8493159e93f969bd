#!/usr/bin/env bash
# `make bench`: the micro-benchmarks (criterion, release), then the end-to-end runs against the
# emulators (started here if not running, and stopped again if this script started them), then
# BENCHMARKS.md rewritten from the results. End to end: ≈ 1 KiB messages (BENCH_MESSAGES, default
# 500000, and the Pub/Sub client floor on BENCH_FLOOR_MESSAGES, default 100000), then the
# three-type sample mix (BENCH_SAMPLE_MESSAGES, default 100000; 0 skips it), then ≈ 4 KiB
# messages, where the byte budget binds (BENCH_4KIB_MESSAGES, default 40000; 0 skips it).
# BENCH_QUICK=1 runs everything briefly (a smoke test of the tooling). About 14 minutes on
# 2 cores with the workspace rebuilt (14 min 26 s with criterion's warm-up and measurement at
# 2 s and 6 s, before they were cut to 1 s and 4 s).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT=target/bench
mkdir -p "$OUT"

# Short enough to keep the whole run under 15 minutes (the end-to-end runs take ≈ 8 of them).
CRITERION_ARGS=(--warm-up-time 1 --measurement-time 4)
if [ "${BENCH_QUICK:-0}" = 1 ]; then
  CRITERION_ARGS=(--warm-up-time 0.2 --measurement-time 0.5 --sample-size 10)
  export BENCH_MESSAGES="${BENCH_MESSAGES:-3000}"
  export BENCH_FLOOR_MESSAGES="${BENCH_FLOOR_MESSAGES:-3000}"
  export BENCH_SAMPLE_MESSAGES="${BENCH_SAMPLE_MESSAGES:-3000}"
  export BENCH_4KIB_MESSAGES="${BENCH_4KIB_MESSAGES:-3000}"
fi

echo "== micro-benchmarks"
cargo bench --locked -p logflow --bench transcode --bench sinks -- "${CRITERION_ARGS[@]}" \
  | tee "$OUT/criterion.txt"

# After the micro-benchmarks: building them rebuilds target/release/logflow without the feature.
echo "== release binary (with the allocation counter, for the end-to-end run)"
cargo build --release --locked -p logflow --features count-allocs --bin logflow

echo "== end to end, ≈ 1 KiB messages (${BENCH_MESSAGES:-500000})"
started_here=0
status="$(scripts/emulators.sh status)"
if [[ "$status" != *"pubsub: running"* ]]; then
  started_here=1
  trap 'scripts/emulators.sh stop' EXIT
  # The Pub/Sub emulator keeps the whole backlog on its Java heap: ~2 GiB per 500k messages.
  LOGFLOW_PUBSUB_JAVA_OPTS="${LOGFLOW_PUBSUB_JAVA_OPTS:--Xmx8g}" scripts/emulators.sh start
fi
eval "$(scripts/emulators.sh env)"
BENCH_MIX=kib cargo bench --locked -p logflow-integration-tests --features emulator-tests --bench e2e
sample="${BENCH_SAMPLE_MESSAGES:-100000}"
if [ "$sample" != 0 ]; then
  echo "== end to end, the sample mix ($sample)"
  BENCH_MIX=sample BENCH_MESSAGES="$sample" BENCH_FLOOR_MESSAGES=0 BENCH_OUT="$ROOT/$OUT/e2e-sample.json" \
    cargo bench --locked -p logflow-integration-tests --features emulator-tests --bench e2e
fi
big="${BENCH_4KIB_MESSAGES:-40000}"
if [ "$big" != 0 ]; then
  echo "== end to end, ≈ 4 KiB messages ($big)"
  BENCH_MIX=4kib BENCH_MESSAGES="$big" BENCH_FLOOR_MESSAGES=0 BENCH_OUT="$ROOT/$OUT/e2e-4kib.json" \
    cargo bench --locked -p logflow-integration-tests --features emulator-tests --bench e2e
fi
[ "$started_here" = 1 ] && echo "(emulators stopped on exit)"

echo "== BENCHMARKS.md"
python3 scripts/bench-report.py > BENCHMARKS.md.new
mv BENCHMARKS.md.new BENCHMARKS.md
echo "BENCHMARKS.md rewritten"
