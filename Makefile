# The README's two commands: `make lab` (the main job) and `make test` (everything CI runs).
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: build lab lab-virtio lab-fleet soak fuzz test bench fuzz-build deps package

deps:
	bash .ci/install-deps

build:
	$(CARGO) build --release

lab: deps build
	bash tests/lab/run.sh

lab-virtio: deps build
	bash tests/lab/run.sh --virtio

# Two gateways announcing over BGP (BIRD) to an ECMP router, clients and the lab cluster.
lab-fleet: deps build
	bash tests/lab/fleet-run.sh

# The lab under constant churn for SOAK_MINUTES minutes (make soak SOAK_MINUTES=30); CI
# (make test) runs the same test for 2 minutes.
SOAK_MINUTES ?= 10
soak: deps build
	SOAK_MINUTES=$(SOAK_MINUTES) $(CARGO) test --release -p tests --test soak -- --nocapture

# Both fuzz targets, FUZZ_RUNS executions each (cargo-fuzz, nightly features through
# RUSTC_BOOTSTRAP; no sanitizer: the targets are safe Rust, overflow checks on). The
# closing notes' figures: FUZZ_RUNS=100000000 for receive_path, 10000000 for manifests.
FUZZ_RUNS ?= 1000000
fuzz: deps
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	mkdir -p fuzz/corpus/receive_path fuzz/corpus/manifests_config
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O -a -s none receive_path \
	  -- -runs=$(FUZZ_RUNS) -print_final_stats=1
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O -a -s none manifests_config \
	  corpus/manifests_config ../configs ../configs/lab ../configs/deploy \
	  -- -runs=$(FUZZ_RUNS) -print_final_stats=1

test: deps
	$(CARGO) fmt --all -- --check
	promtool check rules configs/prometheus/servicegate.rules.yml
	promtool check config configs/prometheus/prometheus.yml
	$(CARGO) clippy --release --all-targets -- -D warnings
	$(CARGO) build --release
	bash .ci/package-check
	$(CARGO) test --release --workspace --exclude tests
	# The packet path again with debug assertions and overflow checks on.
	$(CARGO) test -p dataplane
	$(CARGO) test --release -p tests -- --test-threads=1
	$(CARGO) build --release --manifest-path fuzz/Cargo.toml

# target/debian/servicegate_<version>-1_amd64.deb, installed and checked (needs root).
package: deps build
	bash .ci/package-check

bench: deps build
	$(CARGO) run --release -p perf -- --suite quick
