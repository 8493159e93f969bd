# logflow: the single entry point. `make help` lists the targets.
.PHONY: help build test unit-test demo bench fuzz lint fmt emulators-start emulators-stop emulators-status check

help:
	@echo "make demo             run logflow end to end on local emulators and print a summary"
	@echo "make test             unit tests, then integration tests on the emulators (started and stopped here)"
	@echo "make lint             cargo fmt --check, clippy -D warnings, Dockerfile and Kubernetes manifest checks"
	@echo "make check            lint + test (what CI runs)"
	@echo "make bench            micro-benchmarks + end-to-end run on the emulators; rewrites BENCHMARKS.md"
	@echo "make fuzz             run the fuzz targets for FUZZ_SECONDS each (nightly + cargo-fuzz)"
	@echo "make build            build everything (debug)"
	@echo "make emulators-start  start Pub/Sub, GCS and BigQuery emulators on 127.0.0.1 (installs them if needed)"
	@echo "make emulators-stop   stop them"

build:
	cargo build --workspace --all-targets --features logflow-integration-tests/emulator-tests

test:
	scripts/test.sh

unit-test:
	cargo test --workspace --exclude logflow-integration-tests

demo:
	scripts/demo.sh

bench:
	scripts/bench.sh

# Bounded fuzzing of the transcoder and the config parser. New inputs that find new paths are
# kept in fuzz/corpus/ (commit the interesting ones: the corpus test replays them in make test).
FUZZ_SECONDS ?= 60
fuzz:
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	cd fuzz && cargo +nightly fuzz run transcode corpus/transcode -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096
	cd fuzz && cargo +nightly fuzz run config -- -max_total_time=$(FUZZ_SECONDS)

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
	scripts/check-dockerfile.sh
	scripts/validate-deploy.sh

fmt:
	cargo fmt --all

check: lint test

emulators-start:
	scripts/emulators.sh start
	@echo "for a shell: eval \"\$$(scripts/emulators.sh env)\""

emulators-stop:
	scripts/emulators.sh stop

emulators-status:
	scripts/emulators.sh status
