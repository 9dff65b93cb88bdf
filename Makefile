# dwcp — build, test, demo and benchmarks.
#
#   make demo   install what is missing, build, run the main job on its embedded default
#   make test   install what is missing, build, run fmt/clippy checks and every test
#
# Other targets: deps, build, lint, bench, criterion, loom, fuzz, models, record-models,
# clean.

SHELL := /bin/bash
CARGO ?= cargo

# Every system package the build, the tests and the benchmarks need.
#  cmake clang libclang-dev  C/C++ builds and bindgen (zstd-sys, verbs bindings)
#  pkg-config libhwloc-dev libudev-dev  hwlocality (hwloc links udev)
#  libfabric-dev             RMA through libfabric (bindings generated from its headers;
#                            its verbs provider finds RDMA NICs, so no verbs headers)
#  iperf3 zstd lz4           baselines the benchmarks run side by side
#  iproute2 iputils-ping     namespaces and links for network tests
#  python3-venv              `make models`: the trainers run in a venv under target/
APT_PACKAGES := cmake clang libclang-dev pkg-config libhwloc-dev libudev-dev \
	libfabric-dev iperf3 zstd lz4 iproute2 iputils-ping python3-venv

.PHONY: all deps build demo test lint bench criterion loom fuzz models record-models clean

all: build

deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (rustup)"; exit 1; }
	@# QEMU >= 9 from bookworm-backports (private sources list), busybox-static, cpio and
	@# the guest kernel: the QEMU guest tests and `dwcp-bench qemu`.
	@tools/qemu-guest/install.sh

build: deps
	$(CARGO) build --workspace --all-targets --release

# The main job: a live migration of a 1 GiB simulated guest (writing ~50 MB/s) between
# two appliances on loopback, 4 streams, with its report.
demo: deps
	$(CARGO) run --release -p dwcp-control --bin dwcpd -- demo

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: lint
	$(CARGO) test --workspace
	$(MAKE) loom

bench: deps
	$(CARGO) run --release -p dwcp-bench -- kernels --json
	$(CARGO) run --release -p dwcp-bench -- transport --json
	$(CARGO) run --release -p dwcp-bench -- codec --json
	$(CARGO) run --release -p dwcp-bench -- wan --json
	$(CARGO) run --release -p dwcp-bench -- control --json
	$(CARGO) run --release -p dwcp-bench -- downtime --json
	$(CARGO) run --release -p dwcp-bench -- security --json
	$(CARGO) run --release -p dwcp-bench -- ml --json
	$(CARGO) run --release -p dwcp-bench -- cluster --json

# Retrain the learned models from the recordings in models/*/data (a few minutes):
# Python with numpy, scikit-learn and onnx (pinned in models/requirements.txt) in a venv
# under target/. The models and their cards are committed; `make test` does not train.
MODELS_VENV := target/models-venv
models: deps
	@[ -x $(MODELS_VENV)/bin/python ] || python3 -m venv $(MODELS_VENV)
	$(MODELS_VENV)/bin/pip install -q -r models/requirements.txt
	$(MODELS_VENV)/bin/python models/link/train.py
	$(MODELS_VENV)/bin/python models/anomaly/train.py
	$(MODELS_VENV)/bin/python models/codec/train.py

# Record the migrations the models learn from (root, about 12 minutes): a 4 GiB guest
# across wanem paths that follow generated traces.
record-models: deps
	$(CARGO) build --release -p dwcp-bench
	./target/release/dwcp-bench ml --record models/link/data
	./target/release/dwcp-bench ml --codec-data models/codec/data

criterion: deps
	$(CARGO) bench -p dwcp-bench

# Model-check the SPSC ring's interleavings (a build of its own: loom swaps the atomics;
# the ring is compiled alone, in dataplane/loom, so the build is the ring and loom).
loom: deps
	RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
		$(CARGO) test -p dwcp-ring-loom --lib --release loom_tests

# Fuzz every decoder that reads network bytes, FUZZ_SECONDS each (cargo-fuzz; stable
# toolchain via RUSTC_BOOTSTRAP for the sanitizer flags). Not part of `make test`.
FUZZ_SECONDS ?= 60
fuzz: deps
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd simd/fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run xbzrle_decode -- -max_total_time=$(FUZZ_SECONDS)
	cd dataplane/fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run frames -- -max_total_time=$(FUZZ_SECONDS)
	cd dataplane/fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run control -- -max_total_time=$(FUZZ_SECONDS)
	cd dataplane/fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run codec -- -max_total_time=$(FUZZ_SECONDS)
	cd dataplane/fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run sealed -- -max_total_time=$(FUZZ_SECONDS)

clean:
	$(CARGO) clean
	rm -rf simd/fuzz/target dataplane/fuzz/target
