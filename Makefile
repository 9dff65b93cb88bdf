# dwcp — build, test, demo and benchmarks.
#
#   make demo   install what is missing, build, run the main job on its embedded default
#   make test   install what is missing, build, run fmt/clippy checks and every test
#
# Other targets: deps, build, lint, bench, criterion, loom, fuzz, clean.

SHELL := /bin/bash
CARGO ?= cargo

# Every system package the build, the tests and the benchmarks need.
#  cmake clang libclang-dev  C/C++ builds and bindgen (zstd-sys, verbs bindings)
#  pkg-config libhwloc-dev libudev-dev  hwlocality (hwloc links udev)
#  libfabric-dev             RMA through libfabric (bindings generated from its headers;
#                            its verbs provider finds RDMA NICs, so no verbs headers)
#  iperf3 zstd lz4           baselines the benchmarks run side by side
#  iproute2 iputils-ping     namespaces and links for network tests
APT_PACKAGES := cmake clang libclang-dev pkg-config libhwloc-dev libudev-dev \
	libfabric-dev iperf3 zstd lz4 iproute2 iputils-ping

.PHONY: all deps build demo test lint bench criterion loom fuzz clean

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
