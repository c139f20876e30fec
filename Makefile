# flowmap: the README's two commands are `make demo` (main job) and `make test` (the test suite).
# Both do all set-up on a fresh machine first (venv with torch, data with checksums, build).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: setup build demo test doctor bundle bundle-gpu-check

setup:
	@./scripts/setup.sh

build: setup
	$(CARGO) build --release --workspace --bins

demo: build
	./scripts/demo.sh

# Formatting and lints are part of the tests: CI fails on unformatted code or any clippy warning.
test: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	$(CARGO) test --release --workspace

doctor: build
	./target/release/flowmap doctor

# Stripped release binaries + run.sh in dist/bundle (git-ignored), for a GPU machine without network.
bundle: setup
	./scripts/bundle.sh

# What scripts/gpu_check.sh needs on a GPU machine without network, in under 64 MiB: the flowmap
# binary (gzip), MNIST and the FID Inception weights stored as float16. Then, there:
#   dist/bundle/gpu_check.sh OUT
bundle-gpu-check: setup
	FLOWMAP_BUNDLE_BINS=flowmap FLOWMAP_BUNDLE_TESTS=0 FLOWMAP_BUNDLE_DATA=mnist FLOWMAP_BUNDLE_WEIGHTS=fp16 FLOWMAP_BUNDLE_GZIP_BINS=1 ./scripts/bundle.sh
