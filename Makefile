# The README's two commands: `make lab` (the main job) and `make test` (everything CI runs).
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: build lab lab-virtio lab-fleet soak test bench fuzz-build deps package

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
